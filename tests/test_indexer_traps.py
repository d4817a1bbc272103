"""embed_client against services and folders that used to give silent wrong results: the text-only service asked
for images, an output of another model, version or dimension, tiny random-weight models, a wrong API key, file
names that are not UTF-8, FIFOs, devices and links out of the folder, oversized files, unreadable folders, and two
indexers on one output. Real tiny models behind real uvicorn servers; the command line in-process or, where a
defect used to hang or eat all memory, as a subprocess with a time and memory limit."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

import embed_client
from embed_client import EmbedClient, ParquetIndex, PhotoFile, index_folder, main
from embed_client.indexer import OutputLocked, locked_output
from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from qwen3_embed import load as load_text_service
from tests.helpers import assert_same_array, image_app, image_bytes, photo_like, serve_in_thread, text_app

ROOT = Path(__file__).resolve().parent.parent
KEY = "traps-key"
LIMIT = 100_000  # the image service's max_image_bytes
TEXT_MODEL = "Z-Image-tiny-text-encoder"
IMAGE_MODEL = "siglip2-tiny"

# Texts the text service's model was asked to embed, and a delay the image service's model sleeps per batch.
TEXT_CALLS: list[int] = []
IMAGE_DELAY = [0.0]


def count_texts(method: Callable[[Sequence[str]], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
    def counted(texts: Sequence[str]) -> np.ndarray:
        TEXT_CALLS.append(len(texts))
        return method(texts)

    return counted


def delay_images(method: Callable[[Sequence[Any]], np.ndarray]) -> Callable[[Sequence[Any]], np.ndarray]:
    def delayed(images: Sequence[Any]) -> np.ndarray:
        time.sleep(IMAGE_DELAY[0])
        return method(images)

    return delayed


@pytest.fixture(scope="module")
def image_url(tiny_siglip: Path) -> Iterator[str]:
    app = image_app(tiny_siglip, wrap_images=delay_images, api_key=KEY, max_items_per_request=3, max_image_bytes=LIMIT)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def text_url(tiny_zimage: Path) -> Iterator[str]:
    with serve_in_thread(text_app(tiny_zimage, wrap_texts=count_texts)) as url:
        yield url


@pytest.fixture
def client(image_url: str) -> Iterator[EmbedClient]:
    with EmbedClient(image_url, api_key=KEY, max_retries=2, backoff_s=0.01) as client:
        yield client


def photo(seed: int) -> bytes:
    return image_bytes(photo_like(40 + seed % 7, 32, seed=seed), "JPEG")


def make_photos(root: Path, names: Sequence[str], seed: int = 0) -> dict[str, bytes]:
    files = {name: photo(seed + i) for i, name in enumerate(names)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def rows_of(out: Path) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in pq.read_table(out).to_pylist()}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["index", *args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_subprocess(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The command line in a process of its own, killed after ``timeout`` s and held to 3 GiB of address space:
    a run that hangs or reads without end fails the test instead of the machine."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    command = [sys.executable, "-m", "embed_client", "index", *args, "--no-progress"]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=limit_memory, check=False
    )


def native(url: str, datas: list[bytes]) -> np.ndarray:
    """The reference: each image alone, as a multipart upload to /embed/images."""
    vectors = []
    for data in datas:
        response = requests.post(
            url + "/embed/images",
            files=[("files", ("x", data))],
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        vectors.append(response.json()["embeddings"][0])
    return np.asarray(vectors, dtype=np.float32)


def report_of(stdout: str) -> dict[str, str]:
    """The listed paths of a run's report ("  path: why") and why."""
    return dict(line.strip().split(": ", 1) for line in stdout.splitlines() if line.startswith("  "))


def only_entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# No silent wrong vectors
# ---------------------------------------------------------------------------------------------------------------


def test_the_client_refuses_images_for_a_text_only_service(text_url: str, tmp_path: Path) -> None:
    (tmp_path / "cat.jpg").write_bytes(photo(1))
    calls = len(TEXT_CALLS)
    with EmbedClient(text_url, max_retries=0) as client:
        with pytest.raises(embed_client.EmbedClientError) as caught:
            client.embed_images([tmp_path / "cat.jpg", photo(2)])
        assert client.requests_sent == 0
        assert client.embed_texts(["a cat"]).shape == (1, client.info()["dimension"])  # texts still work
    assert isinstance(caught.value, embed_client.WrongService)
    assert str(caught.value) == (
        f"{text_url} is a text-only service ({TEXT_MODEL}); point the client at the image service, port 6010"
    )
    assert len(TEXT_CALLS) == calls + 1  # the text above; the images never reached the model


def test_images_for_a_text_only_service_that_is_still_loading_wait_then_refuse(tiny_zimage: Path) -> None:
    """While loading, /info cannot say what the service embeds: the client waits (as for a 503), then refuses."""
    settings = Qwen3Settings(model=str(tiny_zimage))

    def slow_load() -> Any:
        time.sleep(0.5)
        return load_text_service(settings)

    app = build_text_app(settings, load=slow_load)
    with serve_in_thread(app, wait_ready=False) as url, EmbedClient(url, max_retries=100, max_backoff_s=0.05) as client:
        assert client.info()["status"] == "loading"
        with pytest.raises(embed_client.EmbedClientError, match="text-only service") as caught:
            client.embed_images([photo(3)])
        assert isinstance(caught.value, embed_client.WrongService) and client.requests_sent == 0


def test_the_indexer_refuses_a_text_only_service_and_writes_nothing(
    text_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tmp_path / "photos", tmp_path / "out" / "vectors.parquet"
    make_photos(root, ["a.jpg", "b/c.jpg"])
    calls = len(TEXT_CALLS)
    code, stdout, stderr = cli(capsys, str(root), "--out", str(out), "--url", text_url)
    assert code == 1 and not stdout
    assert stderr == (
        f"error: {text_url} is a text-only service ({TEXT_MODEL}); point --url at the image service, port 6010\n"
    )
    assert only_entries(tmp_path) == ["photos"] and len(TEXT_CALLS) == calls  # no output, no .parts, no lock


def test_a_tiny_model_gets_a_loud_warning(image_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, ["a.jpg"])
    code, stdout, stderr = cli(capsys, str(root), "--out", str(out), "--url", image_url, "--api-key", KEY)
    assert code == 0 and "1 embedded" in stdout  # a warning, not a refusal: tests and demos use tiny models
    assert "WARNING" in stderr and IMAGE_MODEL in stderr and "meaningless" in stderr


def test_a_wrong_api_key_says_so(image_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, ["a.jpg"])
    for key in (["--api-key", "wrong"], []):
        code, stdout, stderr = cli(capsys, str(root), "--out", str(out), "--url", image_url, *key)
        assert code == 1 and not stdout
        assert "401" in stderr and "check --api-key (or EMBED_API_KEY)" in stderr and "resume" not in stderr
    assert only_entries(tmp_path) == ["photos"]


def test_an_output_of_another_version_or_model_is_refused_unless_reindex(
    client: EmbedClient, image_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    files = make_photos(root, ["a.jpg", "b.jpg", "c/d.jpg"])
    index_folder(root, out, client, progress=False)
    table = pq.read_table(out)
    pq.write_table(table.set_column(table.schema.get_field_index("version"), "version", pa.array(["0.9"] * 3)), out)
    before = out.read_bytes()
    args = [str(root), "--out", str(out), "--url", image_url, "--api-key", KEY]

    code, stdout, stderr = cli(capsys, *args)
    [error] = [line for line in stderr.splitlines() if not line.startswith("WARNING: ")]  # one line, and a warning
    assert code == 1 and not stdout and error.startswith("error: ")
    for fact in (str(out), f"{IMAGE_MODEL} version 0.9", f"{IMAGE_MODEL} version 1.0", "32 dimensions", "--reindex"):
        assert fact in error, fact
    assert out.read_bytes() == before and only_entries(tmp_path) == ["photos", "vectors.parquet"]

    # Another model's rows from before fingerprints (only the name tells the weights then).
    other = table.set_column(table.schema.get_field_index("model"), "model", pa.array(["other"] * 3))
    other = other.set_column(other.schema.get_field_index("fingerprint"), "fingerprint", pa.nulls(3, pa.string()))
    pq.write_table(other, out)
    with pytest.raises(embed_client.EmbedClientError, match=r"other version 1\.0"):
        index_folder(root, out, client, progress=False)

    code, stdout, _ = cli(capsys, *args, "--reindex")
    assert code == 0 and "3 embedded" in stdout
    rows = rows_of(out)
    assert {(row["model"], row["version"]) for row in rows.values()} == {(IMAGE_MODEL, "1.0")}
    vectors = np.asarray([rows[name]["vector"] for name in files], np.float32)
    assert_same_array(vectors, native(image_url, list(files.values())))


def test_an_output_of_another_dimension_is_refused_unless_reindex(client: EmbedClient, tmp_path: Path) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, ["a.jpg"])
    stat = (root / "a.jpg").stat()
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(16, np.float32)), 16)
    columns = {"path": ["a.jpg"], "size": [stat.st_size], "mtime": [stat.st_mtime], "model": [IMAGE_MODEL]}
    # as the indexer wrote it before path_bytes, for a model of another dimension
    pq.write_table(pa.table({**columns, "version": ["1.0"], "vector": vectors}), out)
    with pytest.raises(embed_client.EmbedClientError, match=r"16 dimensions.*32 dimensions.*--reindex"):
        index_folder(root, out, client, progress=False)
    assert pq.read_table(out).schema.field("vector").type.list_size == 16
    summary = index_folder(root, out, client, progress=False, reindex=True)
    assert summary.embedded == 1 and pq.read_table(out).schema.field("vector").type.list_size == 32


def test_leftover_parts_of_another_model_are_refused_unless_reindex(
    client: EmbedClient, image_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, ["a.jpg", "b.jpg"])
    stat = (root / "a.jpg").stat()
    leftover = ParquetIndex(out, "other-model", "3", 32)
    leftover.write_part([(PhotoFile("a.jpg", root / "a.jpg", stat.st_size, stat.st_mtime), np.ones(32, np.float32))])
    args = [str(root), "--out", str(out), "--url", image_url, "--api-key", KEY]
    code, _, stderr = cli(capsys, *args)
    assert code == 1 and "vectors.parquet.parts" in stderr and "other-model version 3" in stderr
    assert "--reindex" in stderr and not out.exists()
    code, stdout, _ = cli(capsys, *args, "--reindex")
    assert code == 0 and "2 embedded" in stdout and not out.with_name("vectors.parquet.parts").exists()
    assert {row["model"] for row in rows_of(out).values()} == {IMAGE_MODEL}


# ---------------------------------------------------------------------------------------------------------------
# Hostile folders
# ---------------------------------------------------------------------------------------------------------------


def test_file_names_that_are_not_utf8_are_indexed(
    client: EmbedClient, image_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    files = make_photos(root, ["plain.jpg", "été/ok.jpg"])
    latin1 = photo(9)
    raw_root = os.fsencode(root)
    os.mkdir(raw_root + b"/caf\xe9")
    with open(raw_root + b"/caf\xe9/r\xe9sum\xe9.jpg", "wb") as handle:
        handle.write(latin1)
    with open(raw_root + b"/bad\xff.jpg", "wb") as handle:
        handle.write(b"not an image")
    args = [str(root), "--out", str(out), "--url", image_url, "--api-key", KEY]
    code, stdout, _ = cli(capsys, *args)
    assert code == 0 and "3 embedded" in stdout and "  bad\\xff.jpg: " in stdout

    rows = rows_of(out)
    assert sorted(rows) == ["caf\\xe9/r\\xe9sum\\xe9.jpg", "plain.jpg", "été/ok.jpg"]
    assert rows["caf\\xe9/r\\xe9sum\\xe9.jpg"]["path_bytes"] == b"caf\xe9/r\xe9sum\xe9.jpg"
    assert rows["plain.jpg"]["path_bytes"] is None and rows["été/ok.jpg"]["path_bytes"] is None
    # the documented way back to the file
    stored = rows["caf\\xe9/r\\xe9sum\\xe9.jpg"]
    assert (root / os.fsdecode(stored["path_bytes"])).read_bytes() == latin1
    got = np.asarray([stored["vector"], rows["plain.jpg"]["vector"]], np.float32)
    assert_same_array(got, native(image_url, [latin1, files["plain.jpg"]]))

    code, stdout, _ = cli(capsys, *args)  # the rerun resumes: nothing embedded again but the bad file
    assert code == 0 and "0 embedded, 3 already indexed" in stdout


def test_fifos_devices_and_links_out_of_the_folder_are_not_read(image_url: str, tmp_path: Path) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, ["good.jpg"])
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(photo(5))
    os.mkfifo(root / "fifo.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "passwd.jpg").symlink_to("/etc/passwd")
    (root / "outside.jpg").symlink_to(outside)
    (root / "inner.jpg").symlink_to("good.jpg")  # inside the folder: followed
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "far").symlink_to(tmp_path, target_is_directory=True)  # a folder out of PHOTO_DIR (and a loop)
    args = [str(root), "--out", str(out), "--url", image_url, "--api-key", KEY]

    result = cli_subprocess(args)
    assert result.returncode == 0, result.stderr
    assert sorted(rows_of(out)) == ["good.jpg", "inner.jpg"]
    report = report_of(result.stdout)
    assert "not a regular file" in report["fifo.jpg"] and "FIFO" in report["fifo.jpg"]
    for link in ("zero.jpg", "passwd.jpg", "outside.jpg", "far/"):
        assert "--follow-links" in report[link], (link, result.stdout)
    assert "broken link" in report["dangling.jpg"]

    result = cli_subprocess([*args, "--follow-links"])
    assert result.returncode == 0, result.stderr
    assert sorted(rows_of(out)) == ["far/elsewhere.jpg", "good.jpg", "inner.jpg", "outside.jpg"]
    report = report_of(result.stdout)
    assert "character device" in report["zero.jpg"] and "FIFO" in report["fifo.jpg"]
    assert "passwd.jpg" in report  # followed as asked, and refused by the service: not an image


def test_files_larger_than_the_service_takes_are_reported_without_reading(
    client: EmbedClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, ["a.jpg"])
    with open(root / "huge.jpg", "wb") as handle:
        handle.truncate(LIMIT + 1)  # sparse: takes no disk
    sent: list[int] = []
    real_embed = client.embed_images

    def spy(images: Sequence[Any]) -> np.ndarray:
        sent.extend(len(item) for item in images)
        return real_embed(images)

    monkeypatch.setattr(client, "embed_images", spy)
    summary = index_folder(root, out, client, progress=False)
    assert summary.embedded == 1 and sent and max(sent) < LIMIT
    assert dict(summary.failed)["huge.jpg"] == (
        f"{LIMIT + 1} bytes, more than the service takes (limits.max_image_bytes={LIMIT}); not read"
    )


def test_an_unreadable_folder_is_listed_and_its_rows_kept(
    client: EmbedClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, ["a.jpg", "locked/b.jpg", "locked/deeper/c.jpg"])
    assert index_folder(root, out, client, progress=False).embedded == 3
    real_scandir = os.scandir
    locked = str(root / "locked")

    # Tests run as root, where chmod 000 does not stop reading: the folder refuses the way it would for a user.
    def scandir(path: Any = ".") -> Any:
        if path == locked:  # os.walk passes str; shutil.rmtree passes file descriptors
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    make_photos(root, ["new.jpg"], seed=20)
    summary = index_folder(root, out, client, progress=False)
    assert summary.embedded == 1 and summary.removed == 0
    assert summary.failed == [("locked/", "cannot read the folder: Permission denied")]
    assert sorted(rows_of(out)) == ["a.jpg", "locked/b.jpg", "locked/deeper/c.jpg", "new.jpg"]


# ---------------------------------------------------------------------------------------------------------------
# One output, one indexer
# ---------------------------------------------------------------------------------------------------------------


def test_a_second_indexer_on_the_same_output_stops_at_once(
    client: EmbedClient, image_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, [f"p{i}.jpg" for i in range(7)])
    second: list[tuple[int, str, str]] = []

    def start_another(done: int) -> None:
        if not second:  # while the first run holds the output
            second.append(cli(capsys, str(root), "--out", str(out), "--url", image_url, "--api-key", KEY))

    summary = index_folder(root, out, client, chunk_size=2, concurrency=1, progress=False, on_progress=start_another)
    code, stdout, stderr = second[0]
    assert code == 1 and not stdout
    assert "another indexer" in stderr and f"pid {os.getpid()}" in stderr and str(out) in stderr
    assert summary.embedded == 7 and len(rows_of(out)) == 7
    assert only_entries(tmp_path) == ["photos", "vectors.parquet"]  # the lock file goes with the run


def test_an_output_named_through_a_link_is_the_same_output(client: EmbedClient, tmp_path: Path) -> None:
    """A link to the output takes the output's lock (a run on the link ran beside one on the file), and the run
    writes through the link, never replacing it by a file of its own."""
    root, out, link = tmp_path / "photos", tmp_path / "vectors.parquet", tmp_path / "link.parquet"
    make_photos(root, ["a.jpg", "b.jpg"])
    link.symlink_to(out)
    with locked_output(out), pytest.raises(OutputLocked, match=f"another indexer .* is writing {out}"):
        index_folder(root, link, client, progress=False)
    assert index_folder(root, link, client, progress=False).embedded == 2
    assert link.is_symlink() and sorted(rows_of(out)) == ["a.jpg", "b.jpg"]


def test_a_killed_run_leaves_no_lock_that_blocks_the_next(
    image_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, [f"p{i}.jpg" for i in range(9)])
    lock = tmp_path / "vectors.parquet.lock"
    args = [str(root), "--out", str(out), "--url", image_url, "--api-key", KEY, "--concurrency", "1"]
    IMAGE_DELAY[0] = 0.5  # three requests of three images: the run lasts more than a second
    try:
        command = [sys.executable, "-m", "embed_client", "index", *args, "--no-progress"]
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not lock.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.exists(), "the run never locked its output"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        IMAGE_DELAY[0] = 0.0
    assert lock.exists()  # left behind by the killed run; the kernel released its lock
    code, stdout, _ = cli(capsys, *args)
    assert code == 0 and "9 images found" in stdout and len(rows_of(out)) == 9 and not lock.exists()


def test_a_file_name_cannot_forge_lines_of_the_report(
    image_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name with a line break (or an escape sequence) is shown escaped on its own line of the "not indexed"
    report: it cannot add a line that looks like the report's own, nor recolour the terminal."""
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_photos(root, ["good.jpg"])
    forged = "x.jpg: cannot read\n  good.jpg: not indexed either\x1b[2J.jpg"
    (root / forged).write_bytes(b"not an image")
    code, stdout, _ = cli(capsys, str(root), "--out", str(out), "--url", image_url, "--api-key", KEY)
    assert code == 0, stdout
    report = stdout.split("not indexed (not in the output; tried again on the next run):\n")[1].splitlines()
    assert len(report) == 1 and report[0].startswith("  x.jpg: cannot read\\n  good.jpg: not indexed either\\x1b[2J")
    assert "\x1b" not in stdout
