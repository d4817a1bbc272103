"""The Ray Data bulk import (cluster/): its vectors equal the image service's, reruns skip what is done, a killed run
keeps its finished blocks, and the standalone services never import Ray.

The Ray tests start one small local Ray for the module (2 CPUs, no dashboard, 400 MB object store) and stop it
at the end; the tiny random-weight SigLIP stands in for the real model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cluster.index_images import Summary, main, run
from cluster.pipeline import read_image_spec
from cluster.source import list_images, open_source
from cluster.store import OutputStore
from embed_client.indexer import index_schema, locked_output
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
    table = pq.read_table(out / "vectors")
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "a path twice in a finished output"
    return {row["path"]: row for row in table.to_pylist()}


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
    root, out = tmp_path_factory.mktemp("photos"), tmp_path_factory.mktemp("index")
    files = make_folder(root)
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
    assert pq.read_table(out / "vectors").schema == index_schema(len(service_vectors["one.jpg"]))

    failures = {row["path"]: row for row in pq.read_table(out / "failures").to_pylist()}
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
    kept = len(pq.read_table(out / "vectors"))
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
    assert len(list((out / "vectors").glob("*.parquet"))) == 1
    assert not list((out / "vectors").glob(".*"))


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
    assert set(last) == {"embedded", "skipped", "failed", "removed", "seconds", "out"}
    assert (last["embedded"], last["skipped"], last["failed"], last["removed"]) == (6, 0, 2, 0)
    assert read_vectors(tmp_path / "index").keys() == read_vectors(first_run[1]).keys()


def test_bad_arguments_exit_2_before_starting_ray(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "cluster.index_images", str(tmp_path / "missing"), "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not a folder" in result.stderr


def test_a_uri_lists_like_the_local_folder(tmp_path: Path) -> None:
    make_folder(tmp_path)
    local = list_images(open_source(str(tmp_path)))
    uri = list_images(open_source(tmp_path.as_uri()))  # file://, through pyarrow's filesystem listing
    assert [(f.rel, f.size, f.mtime) for f in uri] == [(f.rel, f.size, f.mtime) for f in local]
    assert len(local) == 8


def test_a_kill_during_compaction_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts written, the compaction's new part written, the old parts not yet deleted: the next run sees every row
    once and its compaction removes the copies."""
    make_folder(tmp_path / "photos")
    files = [f for f in list_images(open_source(str(tmp_path / "photos"))) if f.rel not in FAILING]
    store = OutputStore(str(tmp_path / "out"), "m", "v")
    for start in range(0, len(files), 2):
        chunk = files[start : start + 2]
        store.write_rows(chunk, np.eye(len(chunk), 4, dtype=np.float32))
    monkeypatch.setattr(OutputStore, "_delete_part", _raise_os_error)
    with pytest.raises(OSError):
        store.compact(files)
    monkeypatch.undo()
    assert len(pq.read_table(tmp_path / "out" / "vectors")) == 2 * len(files)  # every row twice

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
    photo = next(f for f in list_images(open_source(str(tmp_path / "photos"))) if f.rel not in FAILING)
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
    assert not (out / "vectors").exists()  # nothing touched, not even a leftover temporary file removed
    with locked_output(out):  # the refused run took nothing with it: the output can be locked again
        pass


def test_refuses_an_out_dir_with_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "vectors").mkdir()
    (tmp_path / "vectors" / "data.parquet").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="did not write"):
        OutputStore(str(tmp_path), "m", "v")


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
