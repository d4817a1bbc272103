"""The bulk indexer: embeds every image under a folder into a parquet file through ``EmbedClient``, resumable
from checkpoints, only new or changed files embedded on a rerun. Owns the output's schema and its atomic writes."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from embed_client.client import EmbedClient, EmbedClientError, ServiceError, ServiceUnreachable

# Named for the package, not the module: one setting covers client and indexer, and log lines read the same.
logger = logging.getLogger("embed_client")

# What the indexer embeds (compared lower-case); HEIC/HEIF/AVIF decode on the server through pillow-heif.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# Errors that belong to one item (undecodable, too large, unexpected failure on it), not to the whole service:
# the indexer retries a failed chunk image by image so one corrupt file does not lose its neighbours.
ITEM_ERROR_STATUSES = frozenset({400, 413, 422, 500})


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


@dataclass
class _ChunkRunner:
    """Sends chunks from a thread pool with a bounded number in flight; collects rows and checkpoints them on the
    main thread (the only one that writes files)."""

    client: EmbedClient
    index: ParquetIndex
    summary: IndexSummary
    checkpoint_rows: int
    checkpoint_s: float
    on_progress: Callable[[int], None] | None
    buffer: list[tuple[PhotoFile, np.ndarray]] = field(default_factory=list)
    last_checkpoint: float = field(default_factory=time.monotonic)

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
