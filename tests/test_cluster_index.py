"""The Ray Data bulk import (cluster/): its vectors equal the image service's, reruns skip what is done, a killed run
keeps its finished blocks, and the standalone services never import Ray.

The Ray tests start one small local Ray for the module (2 CPUs, no dashboard, 400 MB object store) and stop it
at the end; the tiny random-weight SigLIP stands in for the real model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cluster.index_images import Summary, main, run
from cluster.pipeline import read_image_spec
from cluster.source import Listing, Source, SourceFile, list_images, open_source
from cluster.store import OutputStore, output_lock
from common.identity import weights_fingerprint
from common.tiny_models import build_tiny_siglip
from embed_client.files import stored_path, too_large_reason
from embed_client.indexer import OutputLocked, index_schema, locked_output
from siglip2_embed import EMBEDDING_VERSION, Siglip2Encoder, Siglip2Settings, build_app
from tests.doc_examples import claimed_command
from tests.helpers import image_bytes, photo_like, ready_client

ROOT = Path(__file__).resolve().parent.parent


def exif_rotated_jpeg(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: the vector must be of the rotated image, as the service's
    return image_bytes(photo_like(60, 40, seed=seed), "JPEG", exif=exif.tobytes())


def make_folder(root: Path) -> dict[str, bytes]:
    """Nested folders, mixed formats and case, a space and non-ASCII in a name, a corrupt JPEG, text under an image
    name; and files without an image extension, which are never looked at."""
    files = {
        "one.jpg": image_bytes(photo_like(48, 40, seed=1), "JPEG"),
        "a/two.PNG": image_bytes(photo_like(40, 48, seed=2, mode="RGBA")),
        "a/b/three.jpeg": exif_rotated_jpeg(seed=3),
        "a/b/c/four.webp": image_bytes(photo_like(36, 36, seed=4), "WEBP"),
        "a/b/five.gif": image_bytes(photo_like(30, 40, seed=5).convert("P"), "GIF"),
        "with space/ünï six.bmp": image_bytes(photo_like(33, 29, seed=6), "BMP"),
        "a/corrupt.jpg": image_bytes(photo_like(64, 64, seed=7), "JPEG")[:60],
        "a/b/not-an-image.png": b"just some text, not a PNG",
    }
    ignored = {"notes.txt": files["one.jpg"], "a/README": b"hello"}
    for rel, data in {**files, **ignored}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


FAILING = {"a/corrupt.jpg": "invalid_image", "a/b/not-an-image.png": "unsupported_image"}


def read_vectors(out: Path) -> dict[str, dict[str, Any]]:
    table = pq.read_table(out)  # OUT_DIR itself is the dataset of the vectors
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "a path twice in a finished output"
    return {row["path"]: row for row in table.to_pylist()}


def failures_file(out: Path) -> Path:
    """Beside OUT_DIR, not in it: a reader of OUT_DIR sees only the vectors."""
    return out.with_name(out.name + ".failures.parquet")


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A small local Ray for this module; yields its address for the command-line test."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024 * 1024)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def settings(tiny_siglip: Path) -> Siglip2Settings:
    return Siglip2Settings(model=str(tiny_siglip))


@pytest.fixture(scope="module")
def service_vectors(settings: Siglip2Settings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What POST /embed/image answers for every file of the folder (the failing ones: the error code)."""
    root = tmp_path_factory.mktemp("service-photos")
    answers: dict[str, Any] = {}
    for client in ready_client(build_app(settings)):
        for rel, data in make_folder(root).items():
            response = client.post("/embed/image", files={"file": (Path(rel).name, data)})
            body = response.json()
            answers[rel] = body["embedding"] if response.status_code == 200 else body["error"]["code"]
    return answers


@pytest.fixture(scope="module")
def first_run(ray_cluster: str, settings: Siglip2Settings, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The folder imported as object storage is (pyarrow's listing, Ray's reader), with the local file system
    standing in for s3://: every other run here reads local folders with the indexer's walker and reader, and the
    command-line test checks that both give the same output."""
    import cluster.index_images

    root, out = tmp_path_factory.mktemp("photos"), tmp_path_factory.mktemp("index")
    files = make_folder(root)
    as_object_storage = dataclasses.replace(open_source(str(root)), is_local_folder=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.index_images, "open_source", lambda uri: as_object_storage)
        return root, out, files, run(str(root), str(out), settings, batch_size=3)


@pytest.mark.slow
def test_vectors_equal_the_services_and_failures_are_listed(first_run: Any, service_vectors: dict[str, Any]) -> None:
    root, out, files, summary = first_run
    good = sorted(set(files) - set(FAILING))
    assert (summary.embedded, summary.skipped, summary.failed, summary.removed) == (len(good), 0, 2, 0)
    assert summary.out == str(out)

    rows = read_vectors(out)
    assert sorted(rows) == good  # no failed file, nothing without an image extension
    for rel in good:
        row = rows[rel]
        assert cosine(row["vector"], service_vectors[rel]) >= 0.9999, rel
        assert abs(np.linalg.norm(row["vector"]) - 1.0) < 1e-5
        stat = (root / rel).stat()
        assert (row["size"], row["mtime"]) == (stat.st_size, stat.st_mtime)
        assert (row["model"], row["version"]) == ("siglip2-tiny", EMBEDDING_VERSION)
    # The standalone indexer's schema: one reader handles both outputs.
    assert pq.read_table(out).schema == index_schema(len(service_vectors["one.jpg"]))

    failures = {row["path"]: row for row in pq.read_table(failures_file(out)).to_pylist()}
    assert sorted(failures) == sorted(FAILING)
    for rel, code in FAILING.items():
        assert service_vectors[rel] == code  # the service refuses the same files...
        assert failures[rel]["reason"].startswith(f"{code}: ")  # ...for the same reason
        assert failures[rel]["size"] == len(files[rel])


@pytest.mark.slow
def test_reruns_resume_skip_reembed_and_drop(
    ray_cluster: str, settings: Siglip2Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "photos", tmp_path / "index"
    files = {f"d{i % 2}/p{i}.jpg": image_bytes(photo_like(40, 30 + i, seed=10 + i), "JPEG") for i in range(5)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    # A job killed after its first finished block keeps that block; the rerun embeds only the rest.
    write_rows = OutputStore.write_rows

    def die_after_one_block(store: OutputStore, *args: Any) -> None:
        if store.parts:
            raise KeyboardInterrupt
        write_rows(store, *args)

    monkeypatch.setattr(OutputStore, "write_rows", die_after_one_block)
    with pytest.raises(KeyboardInterrupt):
        run(str(root), str(out), settings, batch_size=2)
    monkeypatch.undo()
    kept = len(pq.read_table(out))
    assert kept in (1, 2)  # one block of two files, or the last block, of one
    assert counts(run(str(root), str(out), settings, batch_size=2)) == (5 - kept, kept, 0, 0)
    first = read_vectors(out)
    assert sorted(first) == sorted(files)

    # Nothing changed: nothing embedded (and no Ray job at all).
    assert counts(run(str(root), str(out), settings)) == (0, 5, 0, 0)
    assert read_vectors(out) == first

    # One file's content changes, another's mtime only: exactly those two are embedded again.
    (root / "d0/p0.jpg").write_bytes(image_bytes(photo_like(40, 30, seed=99), "JPEG"))
    os.utime(root / "d1/p1.jpg", (1_600_000_000, 1_600_000_000))
    assert counts(run(str(root), str(out), settings)) == (2, 3, 0, 0)
    second = read_vectors(out)
    assert cosine(second["d0/p0.jpg"]["vector"], first["d0/p0.jpg"]["vector"]) < 0.9999
    assert second["d1/p1.jpg"]["mtime"] == 1_600_000_000
    assert cosine(second["d1/p1.jpg"]["vector"], first["d1/p1.jpg"]["vector"]) >= 0.9999
    assert all(second[rel] == first[rel] for rel in ("d0/p2.jpg", "d1/p3.jpg", "d0/p4.jpg"))

    # A deleted file's row is dropped.
    (root / "d0/p2.jpg").unlink()
    assert counts(run(str(root), str(out), settings)) == (0, 4, 0, 1)
    assert sorted(read_vectors(out)) == sorted(set(files) - {"d0/p2.jpg"})

    # --reindex embeds everything again; a finished run leaves one compacted part.
    assert counts(run(str(root), str(out), settings, reindex=True)) == (4, 0, 0, 0)
    assert len(list(out.glob("*.parquet"))) == 1
    assert not list(out.glob(".*"))


def counts(summary: Summary) -> tuple[int, int, int, int]:
    return summary.embedded, summary.skipped, summary.failed, summary.removed


@pytest.mark.slow
def test_command_line_on_a_running_cluster(ray_cluster: str, tiny_siglip: Path, first_run: Any, tmp_path: Path) -> None:
    root = first_run[0]
    # The command of docs/ray.md, on the test's folders, model and Ray.
    command = claimed_command(
        "tests/test_cluster_index.py::test_command_line_on_a_running_cluster",
        {"~/Pictures": str(root), "vectors/": str(tmp_path / "index")},
        ["--model", str(tiny_siglip), "--address", ray_cluster, "--batch-size", "4"],
    )
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(last) == {"embedded", "skipped", "failed", "removed", "seconds", "out", "failures"}
    assert (last["embedded"], last["skipped"], last["failed"], last["removed"]) == (6, 0, 2, 0)
    # A local folder read by the indexer's reader gives what Ray's reader gave (first_run): the same vectors.
    local, through_ray_reader = read_vectors(tmp_path / "index"), read_vectors(first_run[1])
    assert local.keys() == through_ray_reader.keys()
    assert all(cosine(local[p]["vector"], through_ray_reader[p]["vector"]) >= 0.9999 for p in local)


@pytest.mark.slow
def test_out_dir_reads_back_as_exactly_the_vectors(first_run: Any) -> None:
    """The obvious reads of OUT_DIR give one row per embedded image with its vector: nothing else is in OUT_DIR (the
    failures are beside it), so no reader picks up another schema."""
    import pandas as pd
    import pyarrow.dataset as ds

    _, out, files, summary = first_run
    good = sorted(set(files) - set(FAILING))
    vectors = {rel: row["vector"] for rel, row in read_vectors(out).items()}
    for table in (ds.dataset(out).to_table(), pq.read_table(out)):
        assert table.schema == index_schema(len(vectors["one.jpg"]))
        assert sorted(table.column("path").to_pylist()) == good
    frame = pd.read_parquet(out)
    assert sorted(frame["path"]) == good
    assert all(list(vector) == vectors[path] for path, vector in zip(frame["path"], frame["vector"], strict=True))
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".parquet")) == []
    assert summary.failures == str(failures_file(out))


# Names the indexer takes and Ray's reader did not: bytes that are not UTF-8, a newline, a tab.
ODD_NAMES = [b"caf\xe9.png", b"nl\nname.png", b"tab\tname.png"]
HUGE = 2 * 1024**3  # a sparse .jpg of 2 GiB: reading it whole took a decoding task to 6.4 GB


@pytest.fixture(scope="module")
def odd_run(ray_cluster: str, settings: Siglip2Settings, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One import of a folder with the indexer's traps: odd names, a 2 GiB sparse file, a FIFO, and a file replaced
    by a FIFO and another deleted between the listing and the reading."""
    root, out = tmp_path_factory.mktemp("odd-photos"), tmp_path_factory.mktemp("odd-index") / "out"
    png = image_bytes(photo_like(40, 36, seed=21))
    for name in [*ODD_NAMES, b"plain.png"]:
        with open(os.path.join(os.fsencode(root), name), "wb") as file:  # bytes: any name the OS takes
            file.write(png)
    with open(root / "huge.jpg", "wb") as file:
        file.truncate(HUGE)
    os.mkfifo(root / "pipe.jpg")
    for later in ("becomes-a-fifo.jpg", "deleted.jpg"):
        (root / later).write_bytes(image_bytes(photo_like(30, 30, seed=22), "JPEG"))

    import cluster.index_images

    def list_then_change(source: Source) -> Listing:
        listing = list_images(source)
        (root / "becomes-a-fifo.jpg").unlink()
        os.mkfifo(root / "becomes-a-fifo.jpg")
        (root / "deleted.jpg").unlink()
        return listing

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.index_images, "list_images", list_then_change)
        summary = run(str(root), str(out), settings, batch_size=3)
    failures = {row["path"]: row for row in pq.read_table(failures_file(out)).to_pylist()}
    return root, out, summary, read_vectors(out), failures


@pytest.mark.slow
def test_names_of_any_bytes_are_embedded_keyed_as_the_indexer_keys_them(odd_run: Any) -> None:
    _, _, summary, rows, _ = odd_run
    assert summary.embedded == 4
    # path_bytes as the standalone indexer fills it: the exact bytes where the name is not UTF-8, else null.
    assert rows["caf\\xe9.png"]["path_bytes"] == b"caf\xe9.png"
    assert rows["nl\nname.png"]["path_bytes"] is None and rows["tab\tname.png"]["path_bytes"] is None
    assert [stored_path(os.fsdecode(name)) for name in ODD_NAMES] == [
        (path, rows[path]["path_bytes"]) for path in ("caf\\xe9.png", "nl\nname.png", "tab\tname.png")
    ]
    for path in ("caf\\xe9.png", "nl\nname.png", "tab\tname.png"):  # the same image as plain.png
        assert cosine(rows[path]["vector"], rows["plain.png"]["vector"]) >= 0.9999, path


@pytest.mark.slow
def test_a_file_over_the_limit_is_listed_by_its_size_and_never_read(odd_run: Any, settings: Siglip2Settings) -> None:
    _, _, _, rows, failures = odd_run
    assert "huge.jpg" not in rows
    # The listing's own message, from the size: a read would have ended in the decoder's image_too_large.
    assert failures["huge.jpg"]["reason"] == too_large_reason(HUGE, settings.max_image_bytes)
    assert failures["huge.jpg"]["size"] == HUGE


@pytest.mark.slow
def test_files_that_cannot_be_read_are_failure_rows_not_the_end_of_the_job(odd_run: Any) -> None:
    _, _, summary, rows, failures = odd_run
    assert failures["becomes-a-fifo.jpg"]["reason"] == "not a regular file: a FIFO (named pipe); not read"
    assert failures["deleted.jpg"]["reason"] == "cannot read the file: No such file or directory"
    assert failures["pipe.jpg"]["reason"] == "not a regular file: a FIFO (named pipe); not read"  # as listed
    assert failures["pipe.jpg"]["size"] is None
    assert sorted(failures) == ["becomes-a-fifo.jpg", "deleted.jpg", "huge.jpg", "pipe.jpg"]
    assert summary.failed == 4 and not set(failures) & set(rows)


@pytest.mark.parametrize(
    ("source", "out", "env", "message"),
    [
        ("missing", "out", {}, "missing is not a folder"),
        (
            "photos",
            "photo.png",
            {},
            "--out {tmp}/photo.png: {tmp}/photo.png is a file, not a folder; choose",
        ),
        ("photos", "photo.png/out", {}, "--out {tmp}/photo.png/out: {tmp}/photo.png is a file, not a folder"),
        ("photos", "out", {"EMBED_MAX_IMAGE_BYTES": "lots"}, "invalid setting: max_image_bytes: Input should be"),
    ],
    ids=["no-source", "out-is-a-file", "out-under-a-file", "bad-environment"],
)
def test_bad_arguments_exit_2_in_one_line_before_starting_ray(
    source: str, out: str, env: dict[str, str], message: str, tmp_path: Path
) -> None:
    """As the standalone indexer refuses them: one line, no traceback, before Ray starts."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "one.png").write_bytes(image_bytes(photo_like(20, 20)))
    (tmp_path / "photo.png").write_bytes(image_bytes(photo_like(20, 20)))
    command = [sys.executable, "-m", "cluster.index_images", str(tmp_path / source), "--out", str(tmp_path / out)]
    environment = {**os.environ, **env}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert message.format(tmp=tmp_path) in result.stderr
    assert (tmp_path / "photo.png").is_file()  # left as it was


def without_file(model: Path, into: Path, name: str) -> Path:
    copy = shutil.copytree(model, into)
    (copy / name).unlink()
    return Path(copy)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("missing", "error: Model not found: '{tmp}/missing' is not a local folder. Download it first, for example:"),
        ("no-config", "error: {tmp}/no-config has no config.json. This service needs a fixed-resolution SigLIP"),
        ("no-preprocessor", "error: {tmp}/no-preprocessor has no preprocessor_config.json. The import needs a"),
    ],
    ids=["in-a-task", "in-the-actors", "in-the-driver"],
)
def test_a_model_that_cannot_be_loaded_ends_the_job_with_its_own_message(
    model: str, message: str, ray_cluster: str, tiny_siglip: Path, tmp_path: Path
) -> None:
    """Not a traceback and "run the same command to carry on": a rerun would fail the same way. Wherever the model
    fails: the task that reads its spec on a node (a folder missing here), the encoder actors (a folder of another
    kind: Ray passes their error on as text only), the driver (a folder without the decoders' spec)."""
    without_file(tiny_siglip, tmp_path / "no-config", "config.json")
    without_file(tiny_siglip, tmp_path / "no-preprocessor", "preprocessor_config.json")
    make_folder(tmp_path / "photos")
    command = [sys.executable, "-m", "cluster.index_images", str(tmp_path / "photos"), "--out", str(tmp_path / "out")]
    command += ["--model", str(tmp_path / model), "--address", ray_cluster]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert message.format(tmp=tmp_path) in result.stderr, result.stderr[-3000:]
    assert "run the same command" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith(("then start", "error: "))  # the message ends it


def test_object_storage_lists_like_the_local_folder(tmp_path: Path) -> None:
    """pyarrow's listing (object storage's) finds what the indexer's walker finds, with the same keys; a file://
    URI of a folder of this machine is that folder."""
    make_folder(tmp_path)
    local = open_source(str(tmp_path))
    assert open_source(tmp_path.as_uri()).is_local_folder
    as_object_storage = Source(tmp_path.as_uri(), pa_fs.LocalFileSystem(), str(tmp_path), is_local_folder=False)
    listed = list_images(as_object_storage).files
    walked = list_images(local).files
    assert [(f.rel, f.size, f.mtime) for f in listed] == [(f.rel, f.size, f.mtime) for f in walked]
    assert len(walked) == 8


def test_a_kill_during_compaction_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts written, the compaction's new part written, the old parts not yet deleted: the next run sees every row
    once and its compaction removes the copies."""
    make_folder(tmp_path / "photos")
    files = [f for f in list_images(open_source(str(tmp_path / "photos"))).files if f.rel not in FAILING]
    store = OutputStore(str(tmp_path / "out"), "m", "v")
    for start in range(0, len(files), 2):
        chunk = files[start : start + 2]
        store.write_rows(chunk, np.eye(len(chunk), 4, dtype=np.float32))
    monkeypatch.setattr(OutputStore, "_delete_part", _raise_os_error)
    with pytest.raises(OSError):
        store.compact(files)
    monkeypatch.undo()
    assert len(pq.read_table(tmp_path / "out")) == 2 * len(files)  # every row twice

    again = OutputStore(str(tmp_path / "out"), "m", "v")
    plan = again.plan(files, reindex=False)
    assert (plan.todo, plan.skipped) == ([], len(files))
    again.compact(files)
    assert sorted(read_vectors(tmp_path / "out")) == sorted(f.rel for f in files)
    assert len(again.parts) == 1


def _raise_os_error(store: OutputStore, name: str) -> None:
    raise OSError(f"killed before deleting {name}")


@pytest.mark.parametrize("left_to_defaults", [(), ("resample",), ("size", "resample")])
def test_the_decoders_spec_is_the_encoders(
    left_to_defaults: tuple[str, ...], tiny_siglip: Path, tmp_path: Path
) -> None:
    """The job reads the preprocessor config as plain JSON (no transformers import at start-up); keys a config leaves
    to the processor's defaults are read through transformers. Either way the spec is the one the encoder uses."""
    model = tmp_path / "model"
    shutil.copytree(tiny_siglip, model)
    config_file = model / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["size"], config["resample"] = {"height": 48, "width": 40}, 3  # not the defaults: each key is read
    for key in left_to_defaults:
        del config[key]
    config_file.write_text(json.dumps(config))
    settings = Siglip2Settings(model=str(model))
    encoder = Siglip2Encoder(str(model), torch.device("cpu"), torch.float32)
    expected = encoder.image_spec(settings.max_image_pixels, settings.jpeg_draft, settings.max_decoded_pixels)
    assert read_image_spec(settings) == expected
    assert (expected.height, expected.width) == ((48, 40) if "size" not in left_to_defaults else (224, 224))


def test_parts_are_ordered_by_number_not_by_name(tmp_path: Path) -> None:
    """The last row of a path wins in the order the parts were written, also past the width of the sequence number
    (a name sort puts part ...-100000000 before ...-99999999)."""
    make_folder(tmp_path / "photos")
    photo = next(f for f in list_images(open_source(str(tmp_path / "photos"))).files if f.rel not in FAILING)
    store = OutputStore(str(tmp_path / "out"), "m", "v")
    store._next_seq = 99_999_999
    store.write_rows([photo], np.array([[1, 0, 0, 0]], np.float32))  # older
    store.write_rows([photo], np.array([[0, 1, 0, 0]], np.float32))  # newer: sequence 100000000
    again = OutputStore(str(tmp_path / "out"), "m", "v")
    again.compact([photo])
    assert read_vectors(tmp_path / "out")[photo.rel]["vector"] == [0, 1, 0, 0]


def test_a_second_import_into_the_same_out_dir_is_refused(
    tmp_path: Path, tiny_siglip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs on one OUT_DIR would delete each other's parts: the second stops at once, before Ray starts, and
    says who holds the output."""
    make_folder(tmp_path / "photos")
    out = tmp_path / "out"
    with locked_output(out):
        code = main([str(tmp_path / "photos"), "--out", str(out), "--model", str(tiny_siglip)])
    assert code == 1
    assert f"(pid {os.getpid()}) is writing {out}" in capsys.readouterr().err
    assert not out.exists()  # nothing touched, not even a leftover temporary file removed
    with locked_output(out):  # the refused run took nothing with it: the output can be locked again
        pass


@pytest.mark.parametrize("spelling", ["link", "link-uri", "uri", "dotted"])
def test_one_out_dir_has_one_lock_however_it_is_written(
    spelling: str, tmp_path: Path, tiny_siglip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A link to OUT_DIR, a file:// URI of that link, a URI of OUT_DIR, a path through "..": all hit the lock of the
    run writing OUT_DIR (two runs at once numbered their parts the same and overwrote each other)."""
    out, link, empty = tmp_path / "out", tmp_path / "link", tmp_path / "photos"
    out.mkdir()
    empty.mkdir()  # nothing to embed: a run the lock failed to stop writes at once, and no Ray starts
    link.symlink_to(out, target_is_directory=True)
    written = {
        "link": str(link),
        "link-uri": link.as_uri(),
        "uri": out.as_uri() + "/",
        "dotted": str(tmp_path / "photos" / ".." / "out"),
    }[spelling]
    with locked_output(out):
        code = main([str(empty), "--out", written, "--model", str(tiny_siglip)])
    assert code == 1
    assert f"another indexer (pid {os.getpid()}) is writing {out}" in capsys.readouterr().err
    assert list(out.iterdir()) == [] and not failures_file(out).exists() and not failures_file(link).exists()
    with pytest.raises(OutputLocked), locked_output(out), output_lock(written):
        pass


def write_legacy_part(path: Path, files: list[SourceFile], vectors: np.ndarray) -> None:
    """A part as the older layout holds it (OUT_DIR/vectors/part-R-S.parquet), by the model the import runs, from
    before fingerprints (no such column: the model's name stands for the weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "path": [f.rel for f in files],
            "size": [f.size for f in files],
            "mtime": [f.mtime for f in files],
            "model": ["siglip2-tiny"] * len(files),
            "version": [EMBEDDING_VERSION] * len(files),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
            "path_bytes": pa.nulls(len(files), pa.binary()),
        },
        schema=pa.schema([field for field in index_schema(vectors.shape[1]) if field.name != "fingerprint"]),
    )
    pq.write_table(table, path)


@pytest.mark.parametrize("moved_before", [False, True], ids=["older-layout", "killed-while-moving"])
def test_an_out_dir_of_the_older_layout_is_carried_on(
    moved_before: bool, tmp_path: Path, settings: Siglip2Settings
) -> None:
    """OUT_DIR/vectors/ and OUT_DIR/failures/ of an earlier version: the parts move up into OUT_DIR, nothing is
    embedded again (no Ray job at all), and the output reads back as the vectors, each once."""
    root, out = tmp_path / "photos", tmp_path / "out"
    for i in range(3):
        (root / f"p{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (root / f"p{i}.jpg").write_bytes(image_bytes(photo_like(30, 30 + i, seed=30 + i), "JPEG"))
    files = list_images(open_source(str(root))).files
    vectors = np.eye(3, 4, dtype=np.float32)
    write_legacy_part(out / "vectors" / "part-00000001-00000001.parquet", files[:2], vectors[:2])
    write_legacy_part(out / "vectors" / "part-00000001-00000002.parquet", files[2:], vectors[2:])
    (out / "failures").mkdir()
    pq.write_table(
        pa.table({"path": ["x.jpg"], "size": [1], "mtime": [1.0], "reason": ["old"]}),
        out / "failures" / "failures.parquet",
    )
    if moved_before:  # a run killed after moving one part up
        (out / "vectors" / "part-00000001-00000002.parquet").rename(out / "part-00000001-00000002.parquet")

    summary = run(str(root), str(out), settings)
    assert counts(summary) == (0, 3, 0, 0)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("part-")) == []
    rows = read_vectors(out)
    assert {rel: row["vector"] for rel, row in rows.items()} == {
        f.rel: vectors[i].tolist() for i, f in enumerate(files)
    }
    assert pq.read_table(failures_file(out)).num_rows == 0


def test_rows_under_a_folder_that_cannot_be_listed_are_kept(tmp_path: Path) -> None:
    """As the indexer keeps them: whether those files still exist is unknown, so their vectors stay."""
    make_folder(tmp_path / "photos")
    files = [f for f in list_images(open_source(str(tmp_path / "photos"))).files if f.rel not in FAILING]
    store = OutputStore(str(tmp_path / "out"), "m", "v")
    store.write_rows(files, np.eye(len(files), 4, dtype=np.float32))
    listed = [f for f in files if not f.rel.startswith("a/")]
    store.compact(listed, kept_folders=["a"])
    assert sorted(read_vectors(tmp_path / "out")) == sorted(f.rel for f in files)
    store.compact(listed)
    assert sorted(read_vectors(tmp_path / "out")) == sorted(f.rel for f in listed)


@pytest.mark.parametrize("foreign", ["data.parquet", "vectors/data.parquet", "failures/notes.txt", "_SUCCESS"])
def test_refuses_an_out_dir_with_foreign_files(foreign: str, tmp_path: Path) -> None:
    """OUT_DIR is the dataset: anything in it that this tool did not write (also in the older layout's vectors/)
    would be read with the vectors, or deleted by the compaction."""
    (tmp_path / foreign).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / foreign).write_bytes(b"not ours")
    with pytest.raises(ValueError, match="did not write"):
        OutputStore(str(tmp_path), "m", "v")
    assert (tmp_path / foreign).read_bytes() == b"not ours"


def test_standalone_services_never_import_ray() -> None:
    """Ray is optional (requirements-cluster.txt): the services, the client and common/ load without it."""
    code = (
        "import pkgutil, sys, importlib; sys.modules['ray'] = None; import common; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(common.__path__, 'common.')]; "
        "import siglip2_embed, qwen3_embed, embed_client, embed_client.indexer, embed_client.__main__; "
        "assert not [name for name in sys.modules if name.startswith('ray.')]"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_import_records_and_checks_the_weights(ray_cluster: str, tiny_siglip: Path, tmp_path: Path) -> None:
    """The bulk import's output: the fingerprint in every row; a rerun on the same weights in a renamed folder
    skips everything; other weights under the same name are refused (one line, exit 1), --reindex replaces them.
    An output written before fingerprints carries on, and its parts are rewritten with the column. Each run joins
    the module's Ray, which a run leaves as it found it: connected."""
    import ray

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        (photos / f"p{index}.png").write_bytes(image_bytes(photo_like(40, 30, seed=index)))
    out = tmp_path / "out"
    assert main([str(photos), "--out", str(out), "--model", str(tiny_siglip)]) == 0
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == ray_cluster  # the caller's Ray, kept
    assert set(pq.read_table(out)["fingerprint"].to_pylist()) == {weights_fingerprint([tiny_siglip])}
    renamed = shutil.copytree(tiny_siglip, tmp_path / "renamed")
    assert main([str(photos), "--out", str(out), "--model", str(renamed)]) == 0
    other = build_tiny_siglip(tmp_path / "elsewhere" / tiny_siglip.name, seed=9)
    assert main([str(photos), "--out", str(out), "--model", str(other)]) == 1
    assert main([str(photos), "--out", str(out), "--model", str(other), "--reindex"]) == 0
    assert set(pq.read_table(out)["fingerprint"].to_pylist()) == {weights_fingerprint([other])}
    for part in out.glob("part-*.parquet"):  # as an output written before fingerprints
        pq.write_table(pq.read_table(part).drop_columns(["fingerprint"]), part)
    assert main([str(photos), "--out", str(out), "--model", str(other)]) == 0
    assert all("fingerprint" in pq.read_schema(part).names for part in out.glob("part-*.parquet"))
