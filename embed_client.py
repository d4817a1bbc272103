"""A Python client for the embedding services, and a bulk indexer for a photo folder.

    from embed_client import EmbedClient

    with EmbedClient("http://127.0.0.1:6010", api_key=None) as client:
        images = client.embed_images(["cat.jpg", "dog.png"])   # (2, 1152) float32, L2-normalised
        texts = client.embed_texts(["a photo of a cat"])      # (1, 1152), same space on port 6010

    python -m embed_client index PHOTO_DIR --out vectors.parquet [--url http://127.0.0.1:6010] [--concurrency 4]

The client speaks ``POST /v1/embeddings`` with ``encoding_format="base64"`` (vectors come back as little-endian
float32, several times smaller and faster to parse than JSON floats) and images as ``data:image/...;base64,`` URIs.
It falls back to the native ``/embed/images`` and ``/embed/texts`` routes when a server answers 404 for
``/v1/embeddings``. Requests are split to the server's ``limits.max_items_per_request`` and ``max_body_bytes``
(read once from ``GET /info``). 429 and 503 (queue full, model loading) and connection errors are retried with
exponential backoff and jitter, honouring ``Retry-After``; other errors raise ``ServiceError`` at once.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
from tqdm import tqdm

logger = logging.getLogger("embed_client")

# What the indexer embeds (compared lower-case); HEIC/HEIF/AVIF decode on the server through pillow-heif.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# Worth retrying: the queue is full (429), the model is loading or a request timed out (503), a proxy in between
# lost the backend (502, 504). Anything else will fail the same way again.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Errors that belong to one item (undecodable, too large, unexpected failure on it), not to the whole service:
# the indexer retries a failed chunk image by image so one corrupt file does not lose its neighbours.
ITEM_ERROR_STATUSES = frozenset({400, 413, 422, 500})
# When /info cannot tell (an older or foreign server), stay modest.
DEFAULT_MAX_ITEMS = 32
# Keep request bodies below the server's body limit with room for JSON around the items.
BODY_SAFETY = 0.9

ImageInput = str | os.PathLike[str] | bytes


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


class EmbedClientError(Exception):
    """Base class of everything this module raises."""


class ServiceUnreachable(EmbedClientError):
    """No connection (after retries), or the service did not become ready in time."""


class ServiceError(EmbedClientError):
    """The service answered with an error; carries its ``{"error": {"message", "type", "code"}}`` envelope."""

    def __init__(
        self, status: int, message: str, type_: str = "", code: str = "", request_id: str | None = None
    ) -> None:
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.request_id = request_id
        where = f", request id {request_id}" if request_id else ""
        super().__init__(f"HTTP {status} {code or type_ or 'error'}: {message}{where}")

    @classmethod
    def from_response(cls, response: requests.Response) -> ServiceError:
        request_id = response.headers.get("X-Request-ID")
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["message"]), str(error["type"]), str(error["code"]), request_id)
        except (ValueError, KeyError, TypeError):
            # Not our envelope (a proxy's error page, say): keep a short excerpt of the body.
            return cls(response.status_code, response.text[:200].strip() or response.reason, request_id=request_id)


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------

_MAGIC = [
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG", "image/png"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
]


def sniff_image_type(data: bytes) -> str:
    """The media type of the data URI. The server decodes by content, not by this label, so a guess is enough."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp":
        return "image/avif" if data[8:12] in (b"avif", b"avis") else "image/heic"
    return "image/octet-stream"


def image_data_uri(data: bytes) -> str:
    return f"data:{sniff_image_type(data)};base64,{base64.b64encode(data).decode('ascii')}"


def read_image(item: ImageInput) -> bytes:
    return item if isinstance(item, bytes) else Path(item).read_bytes()


def decode_vector(embedding: str | list[float]) -> np.ndarray:
    """A base64 little-endian float32 string, or a plain list (a server that ignored encoding_format)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
    return np.asarray(embedding, dtype=np.float32)


def split_requests(sizes: Sequence[int], max_items: int, max_bytes: int) -> list[range]:
    """Consecutive index ranges with at most ``max_items`` items and (unless one item alone is larger) at most
    ``max_bytes`` bytes each."""
    ranges: list[range] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= max_items or total + size > max_bytes):
            ranges.append(range(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        ranges.append(range(start, len(sizes)))
    return ranges


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _reason(exc: requests.RequestException) -> str:
    """The last part of requests' nested urllib3 message, e.g. ``[Errno 111] Connection refused``."""
    cause = getattr(exc.args[0], "reason", exc) if exc.args else exc
    return str(cause).rsplit("): ", 1)[-1] or type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------------


class EmbedClient:
    """Blocking client for one service (6010 images + SigLIP text, or 6011 Qwen3 text). Thread-safe: each thread
    gets its own ``requests.Session`` (connection reuse without sharing a session across threads)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:6010",
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        # A short connect timeout: an absent server should fail fast; reading may take a full batch queue.
        self.timeout = (min(10.0, timeout), timeout)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.requests_sent = 0  # successful POSTs (embedding requests), for tests and statistics
        self._sleep: Callable[[float], None] = time.sleep
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._info: dict[str, Any] | None = None
        # None until the first embedding request tells whether the server has /v1/embeddings.
        self._openai_route: bool | None = None

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    # -- public API ---------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /health`` as it is, 503 bodies included (``{"status": "loading"}``): a probe, not retried on 503."""
        response = self._request("GET", "/health", retry_statuses=frozenset())
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise ServiceError.from_response(response) from None
        return body

    def wait_until_ready(self, timeout: float = 300.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll ``/health`` until the model serves (it answers 503 while loading); returns the health body."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.health()
            status = body.get("status")
            if status == "ok":
                return body
            if status not in ("loading", None) or time.monotonic() >= deadline:
                raise ServiceUnreachable(f"{self.url} is not ready (status {status!r}) after {timeout:.0f} s")
            self._sleep(poll_s)

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """``GET /info``: model, version, dimension, batching and limits. Cached once the model is loaded."""
        if self._info is None or refresh:
            body = self._json("GET", "/info")
            if body.get("status") != "ok":
                return body  # still loading: do not cache a body without model and dimension
            self._info = body
        return self._info

    @property
    def max_items_per_request(self) -> int:
        return int(self.info().get("limits", {}).get("max_items_per_request", DEFAULT_MAX_ITEMS))

    @property
    def max_batch_size(self) -> int:
        """Items per forward pass on the server: the chunk that keeps its batcher full without queueing."""
        return int(self.info().get("batching", {}).get("max_batch_size", self.max_items_per_request))

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Image files (paths) or encoded bytes -> ``(n, dimension)`` float32, in input order."""
        return self._embed([image_data_uri(read_image(item)) for item in images], images=True)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``(n, dimension)`` float32, in input order."""
        return self._embed(list(texts), images=False)

    # -- embedding ----------------------------------------------------------------------------------------------

    def _embed(self, inputs: list[str], images: bool) -> np.ndarray:
        if not inputs:
            return np.zeros((0, int(self.info().get("dimension", 0))), dtype=np.float32)
        # Body bytes of each item as JSON sends it (escapes included), plus its quotes and comma.
        sizes = [len(text) + 4 if images else len(json.dumps(text)) + 2 for text in inputs]
        max_bytes = int(self.info().get("limits", {}).get("max_body_bytes", 32 * 1024 * 1024) * BODY_SAFETY)
        ranges = split_requests(sizes, self.max_items_per_request, max_bytes)
        return np.concatenate([self._embed_request(inputs[r.start : r.stop], images) for r in ranges])

    def _embed_request(self, inputs: list[str], images: bool) -> np.ndarray:
        # On 6010 /v1/embeddings reads a text that starts with "data:image/" as an image: such texts take the
        # native route, which never does.
        text_looks_like_image = not images and any(text[:11].lower() == "data:image/" for text in inputs)
        if self._openai_route is not False and not text_looks_like_image:
            response = self._request("POST", "/v1/embeddings", {"input": inputs, "encoding_format": "base64"})
            if response.status_code == 404 and self._openai_route is None:
                logger.info("%s has no /v1/embeddings; using the native routes", self.url)
                self._openai_route = False
            else:
                body = self._checked(response)
                self._openai_route = True
                return self._vectors_from_openai(body, len(inputs))
        path, body = ("/embed/images", {"images_base64": inputs}) if images else ("/embed/texts", {"texts": inputs})
        vectors = np.asarray(self._json("POST", path, body)["embeddings"], dtype=np.float32)
        return vectors.reshape(len(inputs), -1)

    @staticmethod
    def _vectors_from_openai(body: dict[str, Any], count: int) -> np.ndarray:
        data = sorted(body["data"], key=lambda item: item["index"])
        if len(data) != count:
            raise EmbedClientError(f"asked for {count} vectors, got {len(data)}")
        return np.stack([decode_vector(item["embedding"]) for item in data])

    # -- HTTP ---------------------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return self._checked(self._request(method, path, body))

    def _checked(self, response: requests.Response) -> dict[str, Any]:
        if not response.ok:
            raise ServiceError.from_response(response)
        if response.request.method == "POST":
            with self._lock:
                self.requests_sent += 1
        result: dict[str, Any] = response.json()
        return result

    def _request(
        self, method: str, path: str, body: Any = None, retry_statuses: frozenset[int] = RETRY_STATUSES
    ) -> requests.Response:
        """One call, retried on connection errors and ``retry_statuses``; the last answer is returned as it is."""
        attempt = 0
        while True:
            try:
                response = self._session().request(method, self.url + path, json=body, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt >= self.max_retries:
                    raise ServiceUnreachable(f"cannot reach {self.url}{path}: {_reason(exc)}") from exc
                delay, why = self._backoff(attempt), type(exc).__name__
            else:
                if response.status_code not in retry_statuses or attempt >= self.max_retries:
                    return response
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                delay = self._backoff(attempt) if retry_after is None else min(retry_after, self.max_backoff_s)
                why = f"HTTP {response.status_code}"
            logger.info("%s %s: %s, retry %d in %.2f s", method, path, why, attempt + 1, delay)
            self._sleep(delay)
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        """Exponential with "equal jitter": clients that failed together do not come back together."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


# ---------------------------------------------------------------------------------------------------------------
# Bulk indexer
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoFile:
    rel: str  # POSIX path relative to the photo folder: the row's key
    path: Path
    size: int
    mtime: float


@dataclass
class IndexSummary:
    files: int = 0  # images found in the folder
    skipped: int = 0  # already indexed with the same size, mtime, model and version
    embedded: int = 0  # embedded in this run
    removed: int = 0  # rows dropped: the file is gone, changed, or indexed with another model or version
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, server message), not in the output


def scan_photos(root: Path) -> list[PhotoFile]:
    """Every image under ``root`` by extension, sorted, with size and mtime. Symlinked folders are not followed
    (no loops); files that vanish or cannot be stat'ed while scanning are skipped."""
    photos: list[PhotoFile] = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(folder, name)
            try:
                stat = path.stat()
            except OSError:
                continue
            photos.append(PhotoFile(path.relative_to(root).as_posix(), path, stat.st_size, stat.st_mtime))
    return photos


def index_schema(dimension: int) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.float64()),
            ("model", pa.string()),
            ("version", pa.string()),
            ("vector", pa.list_(pa.float32(), dimension)),
        ]
    )


def write_parquet_atomically(table: pa.Table, path: Path) -> None:
    """Readers see the old file or the new one, never half of one: write beside it, flush to disk, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ParquetIndex:
    """The output file plus a sidecar folder of checkpoint parts (``OUT.parts/part-000001.parquet``).

    Parts are written during a run; the end of a run merges main file and parts into a new main file (atomically)
    and then deletes the parts. A run that dies leaves the old main file and its parts, both valid; the next run
    reads them all, the latest row for a path winning."""

    def __init__(self, out: Path, model: str, version: str, dimension: int) -> None:
        self.out = out
        self.parts_dir = out.with_name(out.name + ".parts")
        self.model = model
        self.version = version
        self.schema = index_schema(dimension)
        numbers = [int(p.stem.removeprefix("part-")) for p in self._part_files()]
        self._next_part = max(numbers, default=0) + 1

    def _part_files(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.parquet") if p.stem.removeprefix("part-").isdigit())

    def _read(self, path: Path, required: bool) -> pa.Table | None:
        """One file's rows of this model and version, in our schema. A main file that is not an index is an error
        (never overwrite someone's data); an unreadable part is skipped, its images are embedded again."""
        try:
            table = pq.read_table(path)
            table = table.select(self.schema.names)
            same_space = [
                model == self.model and version == self.version
                for model, version in zip(
                    table.column("model").to_pylist(), table.column("version").to_pylist(), strict=True
                )
            ]
            return table.filter(pa.array(same_space, pa.bool_())).cast(self.schema)
        except (pa.ArrowException, OSError, KeyError) as exc:
            if required:
                raise EmbedClientError(
                    f"{path} exists but is not an index this tool wrote ({exc}); choose another --out"
                ) from exc
            logger.warning("skipping unreadable checkpoint %s: %s", path, exc)
            return None

    def current_rows(self, photos: Sequence[PhotoFile]) -> tuple[pa.Table, int]:
        """Rows (main file, then parts in order; the last row for a path wins) for files that still exist with the
        same size and mtime, sorted by path; and how many indexed paths were dropped as stale."""
        tables = [self._read(self.out, required=True)] if self.out.exists() else []
        tables += [self._read(part, required=False) for part in self._part_files()]
        table = pa.concat_tables([t for t in tables if t is not None] or [self.schema.empty_table()])
        on_disk = {photo.rel: (photo.size, photo.mtime) for photo in photos}
        paths = table.column("path").to_pylist()
        sizes = table.column("size").to_pylist()
        mtimes = table.column("mtime").to_pylist()
        last = {path: row for row, path in enumerate(paths)}
        keep = sorted(
            (row for row in last.values() if on_disk.get(paths[row]) == (sizes[row], mtimes[row])),
            key=lambda row: paths[row],
        )
        return table.take(pa.array(keep, pa.int64())), len(last) - len(keep)

    def write_part(self, rows: Sequence[tuple[PhotoFile, np.ndarray]]) -> None:
        if not rows:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        vectors = np.stack([vector for _, vector in rows]).astype(np.float32)
        table = pa.table(
            {
                "path": [photo.rel for photo, _ in rows],
                "size": [photo.size for photo, _ in rows],
                "mtime": [photo.mtime for photo, _ in rows],
                "model": [self.model] * len(rows),
                "version": [self.version] * len(rows),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
            },
            schema=self.schema,
        )
        write_parquet_atomically(table, self.parts_dir / f"part-{self._next_part:06d}.parquet")
        self._next_part += 1

    def merge(self, photos: Sequence[PhotoFile]) -> pa.Table:
        """Main file + parts -> one new main file; parts are deleted only after the rename."""
        table, _ = self.current_rows(photos)
        write_parquet_atomically(table, self.out)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return table


ChunkResult = tuple[list[tuple[PhotoFile, np.ndarray]], list[tuple[str, str]]]


def embed_chunk(client: EmbedClient, chunk: Sequence[PhotoFile]) -> ChunkResult:
    """One request's worth of photos -> (rows, failures). Runs in a worker thread. An item error (400/413/...)
    fails the whole request, so the chunk is retried photo by photo to find the bad one and keep the rest."""
    readable: list[PhotoFile] = []
    datas: list[bytes] = []
    failed: list[tuple[str, str]] = []
    for photo in chunk:
        try:
            datas.append(photo.path.read_bytes())
            readable.append(photo)
        except OSError as exc:
            failed.append((photo.rel, f"cannot read the file: {exc.strerror or exc}"))
    if not readable:
        return [], failed
    try:
        vectors = client.embed_images(datas)
    except ServiceError as exc:
        if exc.status not in ITEM_ERROR_STATUSES:
            raise
        if len(readable) == 1:
            return [], [*failed, (readable[0].rel, exc.message)]
        rows: list[tuple[PhotoFile, np.ndarray]] = []
        for photo in readable:
            one_rows, one_failed = embed_chunk(client, [photo])
            rows += one_rows
            failed += one_failed
        return rows, failed
    return list(zip(readable, vectors, strict=True)), failed


def index_folder(
    photo_dir: Path,
    out: Path,
    client: EmbedClient,
    *,
    concurrency: int = 4,
    chunk_size: int | None = None,
    checkpoint_rows: int = 1024,
    checkpoint_s: float = 60.0,
    progress: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> IndexSummary:
    """Embed every image under ``photo_dir`` not yet in ``out`` (same path, size, mtime, model and version) and
    write ``out`` anew. Finished work is checkpointed to ``OUT.parts/`` every ``checkpoint_rows`` rows or
    ``checkpoint_s`` seconds and on any interruption, so a rerun resumes. ``on_progress(images_done)`` is called
    after each chunk (tests use it to interrupt a run)."""
    info = client.info(refresh=True)
    if info.get("status") != "ok":
        raise ServiceUnreachable(f"{client.url} is not ready (status {info.get('status')!r})")
    out.parent.mkdir(parents=True, exist_ok=True)
    index = ParquetIndex(out, str(info["model"]), str(info["version"]), int(info["dimension"]))
    photos = scan_photos(photo_dir)
    done, stale = index.current_rows(photos)
    done_paths = set(done.column("path").to_pylist())
    del done  # only the paths are needed now; merge() reads the vectors again
    todo = [photo for photo in photos if photo.rel not in done_paths]
    summary = IndexSummary(files=len(photos), skipped=len(photos) - len(todo), removed=stale)
    # One forward pass per request by default: with `concurrency` requests in flight the server's batcher stays
    # full, and a failed request (one corrupt file) costs little to redo image by image.
    size = max(1, min(chunk_size or client.max_batch_size, client.max_items_per_request))
    chunks = [todo[start : start + size] for start in range(0, len(todo), size)]
    runner = _ChunkRunner(client, index, summary, checkpoint_rows, checkpoint_s, on_progress)
    runner.run(chunks, concurrency, progress)
    index.merge(photos)
    return summary


class _ChunkRunner:
    """Sends chunks from a thread pool with a bounded number in flight; collects rows and checkpoints them on the
    main thread (the only one that writes files)."""

    def __init__(
        self,
        client: EmbedClient,
        index: ParquetIndex,
        summary: IndexSummary,
        checkpoint_rows: int,
        checkpoint_s: float,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self.client = client
        self.index = index
        self.summary = summary
        self.checkpoint_rows = checkpoint_rows
        self.checkpoint_s = checkpoint_s
        self.on_progress = on_progress
        self.buffer: list[tuple[PhotoFile, np.ndarray]] = []
        self.last_checkpoint = time.monotonic()

    def run(self, chunks: Sequence[Sequence[PhotoFile]], concurrency: int, progress: bool) -> None:
        queued: Iterator[Sequence[PhotoFile]] = iter(chunks)
        pending: set[Future[ChunkResult]] = set()
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="embed")
        bar = tqdm(total=sum(map(len, chunks)), unit="img", disable=not progress, dynamic_ncols=True)
        try:
            while True:
                # A couple of chunks per thread in flight: the pool never idles, memory holds only those images.
                while len(pending) < 2 * concurrency and (chunk := next(queued, None)) is not None:
                    pending.add(pool.submit(embed_chunk, self.client, chunk))
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    pending.discard(future)
                    self._collect(future, bar)
                if self._checkpoint_due():
                    self._checkpoint()
                if self.on_progress is not None:
                    self.on_progress(self.summary.embedded + len(self.summary.failed))
        finally:
            # Ctrl-C, a crash of the service, a bug: keep every vector already received, drop what was not sent.
            pool.shutdown(wait=False, cancel_futures=True)
            for future in pending:
                if future.done() and not future.cancelled() and future.exception() is None:
                    self._collect(future, bar)
            self._checkpoint()
            bar.close()

    def _collect(self, future: Future[ChunkResult], bar: Any) -> None:
        rows, failed = future.result()
        self.buffer += rows
        self.summary.embedded += len(rows)
        self.summary.failed += failed
        bar.update(len(rows) + len(failed))
        if failed:
            bar.set_postfix(unreadable=len(self.summary.failed), refresh=False)

    def _checkpoint_due(self) -> bool:
        return len(self.buffer) >= self.checkpoint_rows or time.monotonic() - self.last_checkpoint >= self.checkpoint_s

    def _checkpoint(self) -> None:
        self.index.write_part(self.buffer)
        self.buffer = []
        self.last_checkpoint = time.monotonic()


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embed_client", description="Client tools for the services.")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser(
        "index",
        help="embed every image in a folder tree into a parquet file (resumable)",
        description="Embed every image under PHOTO_DIR through the image service into a parquet file with columns "
        "path, size, mtime, model, version, vector. Reruns embed only new or changed files; an interrupted run "
        "resumes from its checkpoints (OUT.parts/).",
    )
    index.add_argument("photo_dir", type=Path, metavar="PHOTO_DIR")
    index.add_argument("--out", type=Path, required=True, help="the parquet file to write (e.g. vectors.parquet)")
    index.add_argument("--url", default="http://127.0.0.1:6010", help="image service (default %(default)s)")
    index.add_argument("--api-key", default=None, help="Bearer key; default: the EMBED_API_KEY environment variable")
    index.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight (default 4)")
    index.add_argument("--chunk-size", type=_positive_int, default=None, help="images per request (default: server)")
    index.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    index.add_argument("--retries", type=int, default=5, help="retries on 429/503/connection errors (default 5)")
    index.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a loading model (default 300)")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _report(summary: IndexSummary, out: Path) -> None:
    sys.stdout.write(
        f"{out}: {summary.embedded} embedded, {summary.skipped} already indexed, {summary.removed} stale rows "
        f"dropped, {len(summary.failed)} unreadable ({summary.files} images found)\n"
    )
    if summary.failed:
        sys.stdout.write("unreadable images (not in the output; retried on the next run):\n")
        for path, message in summary.failed:
            sys.stdout.write(f"  {path}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.photo_dir.is_dir():
        sys.stderr.write(f"error: {args.photo_dir} is not a folder\n")
        return 2
    api_key = args.api_key or os.environ.get("EMBED_API_KEY")
    with EmbedClient(args.url, api_key=api_key, timeout=args.timeout, max_retries=args.retries) as client:
        try:
            client.wait_until_ready(timeout=args.wait)
        except EmbedClientError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        try:
            summary = index_folder(
                args.photo_dir,
                args.out,
                client,
                concurrency=args.concurrency,
                chunk_size=args.chunk_size,
                progress=not args.no_progress,
            )
        except KeyboardInterrupt:
            sys.stderr.write("interrupted: finished images are checkpointed; run the same command to resume\n")
            return 130
        except EmbedClientError as exc:
            sys.stderr.write(f"error: {exc}\n(finished images are checkpointed; rerun the command to resume)\n")
            return 1
    _report(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
