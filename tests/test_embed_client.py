"""embed_client: the client against the real image service (tiny model, uvicorn in a thread), retries and the
native fallback against a scripted HTTP server, and the bulk indexer on generated photo folders."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

import embed_client
from embed_client import EmbedClient, ServiceError, ServiceUnreachable, index_folder, main, split_requests
from siglip2_embed import Siglip2Settings, build_app, load
from tests.helpers import assert_same_array, free_port, image_bytes, photo_like, serve_in_thread

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_ITEMS = 3  # the service's max_items_per_request: small, so splitting shows with a handful of images


@pytest.fixture(scope="module")
def settings(tiny_siglip: Path) -> Siglip2Settings:
    return Siglip2Settings(model=str(tiny_siglip), max_items_per_request=MAX_ITEMS, api_key=KEY)


@pytest.fixture(scope="module")
def service_url(settings: Siglip2Settings) -> Iterator[str]:
    with serve_in_thread(build_app(settings)) as url:
        yield url


@pytest.fixture
def client(service_url: str) -> Iterator[EmbedClient]:
    with EmbedClient(service_url, api_key=KEY, max_retries=2, backoff_s=0.01) as client:
        yield client


def native_images(url: str, datas: list[bytes]) -> np.ndarray:
    """The reference: multipart upload to /embed/images, one request per image (a different transfer path)."""
    vectors = []
    for data in datas:
        response = requests.post(url + "/embed/images", files=[("files", ("x", data))], headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        vectors.append(response.json()["embeddings"][0])
    return np.asarray(vectors, dtype=np.float32)


def native_texts(url: str, texts: list[str]) -> np.ndarray:
    vectors = []
    for text in texts:
        response = requests.post(url + "/embed/texts", json={"texts": [text]}, headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        vectors.append(response.json()["embeddings"][0])
    return np.asarray(vectors, dtype=np.float32)


def photos(count: int, seed: int = 0) -> list[bytes]:
    return [image_bytes(photo_like(40 + i, 32, seed=seed + i), "JPEG") for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# The client against the real service
# ---------------------------------------------------------------------------------------------------------------


def test_embed_images_matches_native_routes_and_splits(client: EmbedClient, service_url: str, tmp_path: Path) -> None:
    datas = photos(7)
    (tmp_path / "first.jpg").write_bytes(datas[0])
    before = client.requests_sent
    got = client.embed_images([tmp_path / "first.jpg", str(tmp_path / "first.jpg"), *datas[1:]])
    assert client.requests_sent - before == 3  # 7 images, at most 3 per request
    assert_same_array(got, native_images(service_url, [datas[0], *datas]))
    # the split is needed: the service refuses more than MAX_ITEMS at once
    too_many = requests.post(service_url + "/embed/texts", json={"texts": ["a"] * 4}, headers=AUTH, timeout=10)
    assert too_many.status_code == 413


def test_embed_texts_matches_native_routes(client: EmbedClient, service_url: str) -> None:
    # a text that looks like a data URI must stay a text (the OpenAI route would read it as an image)
    texts = ["a photo of a cat", "一只狗", "the sea", "data:image/png;base64,AAAA", "x" * 300]
    assert_same_array(client.embed_texts(texts), native_texts(service_url, texts))
    assert client.embed_texts([]).shape == (0, client.info()["dimension"])


def test_client_uses_the_openai_route(client: EmbedClient) -> None:
    client.embed_texts(["a"])
    assert client._openai_route is True


def test_info_and_health(client: EmbedClient) -> None:
    assert client.health()["status"] == "ok"
    info = client.info()
    assert info["limits"]["max_items_per_request"] == MAX_ITEMS == client.max_items_per_request
    assert client.max_batch_size == info["batching"]["max_batch_size"]


def test_bad_image_raises_with_the_servers_envelope(client: EmbedClient) -> None:
    with pytest.raises(ServiceError) as caught:
        client.embed_images([b"definitely not an image"])
    error = caught.value
    assert (
        error.status == 400
        and error.code in ("invalid_image", "unsupported_image")
        and error.type == "invalid_request_error"
    )
    assert error.message and error.message in str(error) and error.request_id


def test_wrong_api_key_is_not_retried(service_url: str) -> None:
    with EmbedClient(service_url, api_key="wrong", backoff_s=10) as client:
        started = time.monotonic()
        with pytest.raises(ServiceError) as caught:
            client.embed_texts(["a"])
    assert caught.value.status == 401 and time.monotonic() - started < 5


def test_retries_while_the_model_loads(settings: Siglip2Settings) -> None:
    """The real service answers 503 (Retry-After: 5) while loading; the client waits it out."""

    def slow_load() -> Any:
        time.sleep(0.5)
        return load(settings)

    with serve_in_thread(build_app(settings, load=slow_load), wait_ready=False) as url:
        assert requests.get(url + "/health", timeout=5).status_code == 503
        delays: list[float] = []
        with EmbedClient(url, api_key=KEY, max_retries=100, max_backoff_s=0.05) as client:

            def record_and_sleep(seconds: float) -> None:
                delays.append(seconds)
                time.sleep(seconds)

            client._sleep = record_and_sleep
            vectors = client.embed_texts(["a cat"])
        assert delays and max(delays) == 0.05  # Retry-After 5, capped by max_backoff_s
        assert_same_array(vectors, native_texts(url, ["a cat"]))


# ---------------------------------------------------------------------------------------------------------------
# Retries and fallback against a scripted server
# ---------------------------------------------------------------------------------------------------------------


def fake_vector(text: str) -> list[float]:
    return [float(len(text)), float(ord(text[0])), 1.5, -2.0]


class ScriptedServer(ThreadingHTTPServer):
    """Answers POSTs with the scripted failures first, then with vectors; records every POST path."""

    def __init__(self, failures: list[tuple[int, dict[str, str]]], openai: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.failures = failures
        self.openai = openai
        self.posts: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def error(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.reply(status, {"error": {"message": f"scripted {status}", "type": "t", "code": f"c{status}"}}, headers)

    def do_GET(self) -> None:
        info = {"status": "ok", "model": "fake", "version": "9", "dimension": 4}
        limits = {"limits": {"max_items_per_request": 2, "max_body_bytes": 10_000}, "batching": {"max_batch_size": 2}}
        self.reply(200, {**info, **limits} if self.path == "/info" else info)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts.append(self.path)
        if self.server.failures:
            self.error(*self.server.failures.pop(0))
        elif self.path == "/v1/embeddings" and self.server.openai:
            assert body["encoding_format"] == "base64"
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(np.asarray(fake_vector(text), "<f4").tobytes()).decode(),
                }
                for i, text in enumerate(body["input"])
            ]
            self.reply(200, {"object": "list", "data": data[::-1], "model": "fake"})  # any order: index decides
        elif self.path == "/embed/texts":
            self.reply(200, {"embeddings": [fake_vector(text) for text in body["texts"]], "dimension": 4})
        else:
            self.error(404)


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer([])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def recording_client(url: str, max_retries: int = 3) -> tuple[EmbedClient, list[float]]:
    client = EmbedClient(url, max_retries=max_retries, backoff_s=0.2, max_backoff_s=1.0)
    delays: list[float] = []
    client._sleep = delays.append
    return client, delays


def test_retries_429_and_503_honouring_retry_after(scripted: ScriptedServer) -> None:
    scripted.failures[:] = [(503, {"Retry-After": "0.05"}), (429, {}), (503, {"Retry-After": "60"})]
    client, delays = recording_client(scripted.url)
    vectors = client.embed_texts(["ab", "c"])
    np.testing.assert_array_equal(vectors, [fake_vector("ab"), fake_vector("c")])
    assert scripted.posts == ["/v1/embeddings"] * 4
    assert delays[0] == 0.05  # Retry-After, as the server said
    assert 0.2 <= delays[1] <= 0.4  # backoff 0.2 * 2**1 with equal jitter
    assert delays[2] == 1.0  # Retry-After capped by max_backoff_s


def test_gives_up_after_max_retries(scripted: ScriptedServer) -> None:
    scripted.failures[:] = [(503, {})] * 3
    client, delays = recording_client(scripted.url, max_retries=2)
    with pytest.raises(ServiceError) as caught:
        client.embed_texts(["a"])
    assert caught.value.status == 503 and caught.value.code == "c503" and len(delays) == 2


def test_a_500_is_retried_a_bounded_number_of_times(scripted: ScriptedServer) -> None:
    """What a request in flight on a dying Ray Serve replica gets: retried (embedding is idempotent) with the 503
    backoff, at most twice, so that a 500 an item causes every time still reaches the indexer soon."""
    scripted.failures[:] = [(500, {}), (500, {})]
    client, delays = recording_client(scripted.url, max_retries=5)
    np.testing.assert_array_equal(client.embed_texts(["a"]), [fake_vector("a")])
    assert len(scripted.posts) == 3 and 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.4
    scripted.failures[:] = [(500, {})] * 3
    client, delays = recording_client(scripted.url, max_retries=5)
    with pytest.raises(ServiceError) as caught:
        client.embed_texts(["a"])
    assert caught.value.status == 500 and len(delays) == 2


def test_other_4xx_are_not_retried(scripted: ScriptedServer) -> None:
    scripted.failures[:] = [(400, {})]
    client, delays = recording_client(scripted.url)
    with pytest.raises(ServiceError, match="HTTP 400 c400: scripted 400") as caught:
        client.embed_texts(["a"])
    assert caught.value.message == "scripted 400" and scripted.posts == ["/v1/embeddings"] and not delays


def test_connection_errors_are_retried_then_reported() -> None:
    client, delays = recording_client(f"http://127.0.0.1:{free_port()}", max_retries=2)
    with pytest.raises(ServiceUnreachable):
        client.embed_texts(["a"])
    assert len(delays) == 2 and 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.4


def test_falls_back_to_native_routes_on_404(scripted: ScriptedServer) -> None:
    scripted.openai = False
    client, _ = recording_client(scripted.url)
    np.testing.assert_array_equal(client.embed_texts(["ab", "c", "def"]), [fake_vector(t) for t in ["ab", "c", "def"]])
    client.embed_texts(["again"])
    # one probe of /v1/embeddings, then native only; 3 texts split at max_items_per_request=2
    assert scripted.posts == ["/v1/embeddings", "/embed/texts", "/embed/texts", "/embed/texts"]


def test_an_old_server_without_modalities_still_gets_images(scripted: ScriptedServer) -> None:
    """A server whose /info does not say which inputs it embeds is assumed to take images, as before."""
    client, _ = recording_client(scripted.url)
    assert "modalities" not in client.info()
    vectors = client.embed_images([b"\x89PNG\r\n\x1a\n...", b"GIF89a..."])
    assert vectors.shape == (2, 4) and scripted.posts == ["/v1/embeddings"]


def test_the_client_imports_without_the_indexers_dependencies() -> None:
    """A program that only embeds installs requests and numpy: pyarrow and tqdm load with the indexer, on first use,
    and torch with Z-Image's prompt embeddings (embed_client.zimage imports it only when called)."""
    code = (
        "import sys; sys.modules['pyarrow'] = sys.modules['tqdm'] = sys.modules['torch'] = None; "
        "from embed_client import EmbedClient; import embed_client.zimage, embed_client.token_states"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_split_requests_by_count_and_bytes() -> None:
    assert split_requests([1] * 5, 2, 100) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split_requests([60, 60, 10, 200, 5], 10, 100) == [range(0, 1), range(1, 3), range(3, 4), range(4, 5)]
    assert split_requests([], 3, 10) == []


# ---------------------------------------------------------------------------------------------------------------
# The bulk indexer
# ---------------------------------------------------------------------------------------------------------------


def make_folder(root: Path) -> dict[str, bytes]:
    """Nested folders, mixed formats and case, one corrupt .jpg, and images under non-image names (ignored)."""
    files = {
        "a/one.jpg": image_bytes(photo_like(48, 40, seed=1), "JPEG"),
        "a/b/two.PNG": image_bytes(photo_like(40, 48, seed=2)),
        "a/b/c/three.jpeg": image_bytes(photo_like(50, 30, seed=3), "JPEG"),
        "four.webp": image_bytes(photo_like(36, 36, seed=4), "WEBP"),
        "five.gif": image_bytes(photo_like(30, 40, seed=5).convert("P"), "GIF"),
        "a/bad.jpg": b"\xff\xd8\xff\xe0 truncated, not really a JPEG",
    }
    ignored = {"notes.txt": files["a/one.jpg"], "a/b/README": b"hello", "a/image.jpg.bak": files["four.webp"]}
    for rel, data in {**files, **ignored}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_index(out: Path) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in pq.read_table(out).to_pylist()}


def test_indexer_embeds_reports_and_resumes(client: EmbedClient, service_url: str, tmp_path: Path) -> None:
    root, out = tmp_path / "photos", tmp_path / "out" / "vectors.parquet"
    files = make_folder(root)
    summary = index_folder(root, out, client, concurrency=2, progress=False)

    good = sorted(rel for rel in files if rel != "a/bad.jpg")
    assert (summary.files, summary.embedded, summary.skipped) == (6, 5, 0)
    assert [path for path, _ in summary.failed] == ["a/bad.jpg"] and summary.failed[0][1]
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == good
    assert table.schema.field("vector").type == pa.list_(pa.float32(), client.info()["dimension"])
    rows = read_index(out)
    info = client.info()
    for rel in good:
        stat = (root / rel).stat()
        assert rows[rel]["size"] == stat.st_size and rows[rel]["mtime"] == stat.st_mtime
        assert (rows[rel]["model"], rows[rel]["version"]) == (info["model"], info["version"])
    vectors = np.asarray([rows[rel]["vector"] for rel in good], dtype=np.float32)
    assert_same_array(vectors, native_images(service_url, [files[rel] for rel in good]))
    assert not out.with_name("vectors.parquet.parts").exists()

    # rerun: two new files, one changed, one deleted -> only three embedded (and the bad file tried again)
    (root / "a/new.JPG").write_bytes(image_bytes(photo_like(44, 44, seed=7), "JPEG"))
    (root / "z/new.png").parent.mkdir()
    (root / "z/new.png").write_bytes(image_bytes(photo_like(30, 30, seed=8)))
    changed = image_bytes(photo_like(48, 40, seed=9), "JPEG")
    (root / "a/one.jpg").write_bytes(changed)
    os.utime(root / "a/one.jpg", (1_000_000, 1_000_000))
    (root / "four.webp").unlink()
    before = client.requests_sent
    summary = index_folder(root, out, client, concurrency=2, progress=False)
    assert (summary.files, summary.embedded, summary.skipped, summary.removed) == (7, 3, 3, 2)
    assert client.requests_sent - before <= 3  # one chunk of 3 images (+1 for bad.jpg alone or its chunk retry)
    rows = read_index(out)
    assert sorted(rows) == sorted({*good, "a/new.JPG", "z/new.png"} - {"four.webp"})
    assert rows["a/one.jpg"]["mtime"] == 1_000_000
    assert_same_array(np.asarray([rows["a/one.jpg"]["vector"]], np.float32), native_images(service_url, [changed]))

    # another embedding version in the file: refused (never two spaces in one index), replaced with reindex=True
    table = pq.read_table(out)
    pq.write_table(table.set_column(4, "version", pa.array(["0.9"] * len(table))), out)
    with pytest.raises(embed_client.EmbedClientError, match="--reindex"):
        index_folder(root, out, client, progress=False)
    summary = index_folder(root, out, client, progress=False, reindex=True)
    assert (summary.embedded, summary.skipped, summary.replaced) == (6, 0, 6)
    assert {row["version"] for row in read_index(out).values()} == {info["version"]}


def test_interrupted_run_resumes_without_redoing_work(client: EmbedClient, tmp_path: Path) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    for i, data in enumerate(photos(8, seed=20)):
        (root / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 2}/p{i}.jpg").write_bytes(data)

    def interrupt(done: int) -> None:
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_folder(
            root, out, client, concurrency=1, chunk_size=2, checkpoint_rows=2, progress=False, on_progress=interrupt
        )
    assert not out.exists()  # nothing merged, and nothing half-written
    parts = sorted(out.with_name("vectors.parquet.parts").glob("*"))
    assert parts and all(part.name.startswith("part-") and part.suffix == ".parquet" for part in parts)
    saved = sum(pq.read_table(part).num_rows for part in parts)
    assert 4 <= saved < 8

    summary = index_folder(root, out, client, concurrency=2, progress=False)
    assert (summary.embedded, summary.skipped) == (8 - saved, saved)
    assert len(read_index(out)) == 8 and not out.with_name("vectors.parquet.parts").exists()


def test_a_crash_while_merging_keeps_the_old_file(
    client: EmbedClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    root.mkdir()
    (root / "one.png").write_bytes(photos(1)[0])
    index_folder(root, out, client, progress=False)
    (root / "two.png").write_bytes(photos(1, seed=5)[0])
    real_write = pq.write_table

    def crash_on_merge(table: pa.Table, where: Any, **kwargs: Any) -> None:
        if Path(where).name.startswith(".vectors.parquet."):
            Path(where).write_bytes(b"PAR1 half a file")  # dies halfway through writing the new main file
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", crash_on_merge)  # the module embed_client.indexer writes through
    with pytest.raises(OSError, match="disk full"):
        index_folder(root, out, client, progress=False)
    monkeypatch.undo()
    assert list(read_index(out)) == ["one.png"]  # the old file, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "vectors.parquet", "vectors.parquet.parts"]

    summary = index_folder(root, out, client, progress=False)
    assert (summary.embedded, summary.skipped) == (0, 2)  # two.png came back from its checkpoint
    assert sorted(read_index(out)) == ["one.png", "two.png"]


def test_refuses_to_overwrite_a_foreign_parquet_file(client: EmbedClient, tmp_path: Path) -> None:
    out = tmp_path / "data.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), out)
    with pytest.raises(embed_client.EmbedClientError, match="not an index"):
        index_folder(tmp_path, out, client, progress=False)
    assert pq.read_table(out).column_names == ["x"]


def test_command_line(service_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    make_folder(root)
    args = ["index", str(root), "--out", str(out), "--url", service_url, "--api-key", KEY, "--concurrency", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "5 embedded" in captured.out and "a/bad.jpg: " in captured.out and "img/s" in captured.err
    assert len(read_index(out)) == 5
    assert main([*args, "--no-progress"]) == 0
    assert "0 embedded, 5 already indexed" in capsys.readouterr().out


def test_command_line_fails_when_the_service_is_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["index", str(tmp_path), "--out", str(tmp_path / "v.parquet"), "--url", url, "--retries", "0"]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "v.parquet").exists()
