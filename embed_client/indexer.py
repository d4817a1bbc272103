"""The bulk indexer: embeds every image under a folder into a parquet file through ``EmbedClient``, resumable
from checkpoints, only new or changed files embedded on a rerun. Owns the output's schema, its atomic writes, and
its lock (one indexer per output).

Files are found and read by ``embed_client.files`` (shared with the Ray import): only regular files, never more than
the service takes (``limits.max_image_bytes``); file names that are not UTF-8 are kept losslessly: ``path`` shows
them with ``\\xNN`` escapes, ``path_bytes`` holds their bytes."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from embed_client.client import EmbedClient, EmbedClientError, ServiceError, ServiceUnreachable
from embed_client.files import (
    PhotoFile,
    Scan,
    read_or_reason,
    rel_of_row,
    scan_folder,
    stored_path,
    too_large_reason,
)

# Named for the package, not the module: one setting covers client and indexer, and log lines read the same.
logger = logging.getLogger("embed_client")

# Errors that belong to one item (undecodable, too large, unexpected failure on it), not to the whole service:
# the indexer retries a failed chunk image by image so one corrupt file does not lose its neighbours.
ITEM_ERROR_STATUSES = frozenset({400, 413, 422, 500})
# The largest file read when /info does not say (an older server): the services' default max_image_bytes.
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024


class IndexRefused(EmbedClientError):
    """The run stopped before writing anything; the message says why and what to do."""


class IndexMismatch(IndexRefused):
    """The output (or its leftover checkpoints) holds vectors of other weights, another version or dimension."""


class OutputLocked(IndexRefused):
    """Another indexer is writing the same output."""


@dataclass
class IndexSummary:
    files: int = 0  # images found in the folder (regular files, or links to them, with an image extension)
    skipped: int = 0  # already indexed with the same size and mtime by the same weights and version
    embedded: int = 0  # embedded in this run
    removed: int = 0  # rows dropped: the file is gone or changed
    replaced: int = 0  # rows of the previous output that a reindex replaced
    # (path as shown, why): not in the output; tried again on the next run. Files the service could not decode,
    # files it would not take, FIFOs and devices, links not followed, folders that cannot be read.
    failed: list[tuple[str, str]] = field(default_factory=list)


def max_image_bytes(info: dict[str, Any]) -> int:
    """The largest file worth reading for the service of this ``/info``."""
    limits = info.get("limits", {})
    if "max_image_bytes" in limits:
        return int(limits["max_image_bytes"])
    if "max_body_bytes" in limits:  # an older server: the image must fit in a body, base64-encoded
        return int(limits["max_body_bytes"]) // 4 * 3
    return DEFAULT_MAX_IMAGE_BYTES


def index_schema(dimension: int) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.float64()),
            ("model", pa.string()),
            ("version", pa.string()),
            ("vector", pa.list_(pa.float32(), dimension)),
            # the name's bytes, only where it is not valid UTF-8 (then `path` shows it with \xNN escapes)
            ("path_bytes", pa.binary()),
            # of the weights that made the vector (the service's /info): the same weights under another name are
            # the same space; null in rows written before fingerprints (then the model's name stands for them)
            ("fingerprint", pa.string()),
        ]
    )


def same_weights(row: tuple[str, str, str | None], ours: tuple[str, str, str | None]) -> bool:
    """Whether vectors of ``row`` and ``ours`` (model, version, fingerprint) are of one space: the same version and
    the same weights, by fingerprint when both have one, else (an index or a service from before fingerprints) by
    the model's name."""
    (model, version, fingerprint), (our_model, our_version, our_fingerprint) = row, ours
    if version != our_version:
        return False
    if fingerprint is not None and our_fingerprint is not None:
        return fingerprint == our_fingerprint
    return model == our_model


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


@contextmanager
def locked_output(out: Path) -> Iterator[Path]:
    """Holds ``OUT.lock`` (an flock) while a run reads and writes ``out`` and its parts; another run on the same
    output raises ``OutputLocked`` at once. The kernel drops the lock of a killed run: a lock file left behind
    does not block the next run. The file is removed at the end while still locked; a run that locked a file
    just removed that way locks the new one instead (the inode check). The lock is taken on ``out`` with every link
    resolved: one output has one lock however its path is written."""
    out = out.resolve()
    lock = out.with_name(out.name + ".lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"another indexer (pid {holder})" if holder.isdigit() else "another indexer"
            raise OutputLocked(
                f"{who} is writing {out}; wait for it to finish, or choose another --out (lock file: {lock})"
            ) from None
        try:
            current = os.stat(lock)
            locked = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


class ParquetIndex:
    """The output file plus a sidecar folder of checkpoint parts (``OUT.parts/part-000001.parquet``).

    Parts are written during a run; the end of a run merges main file and parts into a new main file (atomically)
    and then deletes the parts. A run that dies leaves the old main file and its parts, both valid; the next run
    reads them all, the latest row for a path winning.

    Vectors of one space only (the same weights, version and dimension; ``same_weights``): a main file or part that
    holds others raises ``IndexMismatch``, unless ``reindex``: then the main file's rows are replaced and such parts
    ignored (parts of this model are kept, so an interrupted reindex resumes)."""

    def __init__(
        self,
        out: Path,
        model: str,
        version: str,
        dimension: int,
        *,
        fingerprint: str | None = None,
        reindex: bool = False,
        source: str = "",
    ) -> None:
        self.out = out
        self.parts_dir = out.with_name(out.name + ".parts")
        self.model = model
        self.version = version
        self.fingerprint = fingerprint
        self.dimension = dimension
        self.reindex = reindex
        self.source = source or "the service"
        self.schema = index_schema(dimension)
        self.replaced = 0  # rows of the main file that a reindex replaces (set by current_rows)
        numbers = [int(p.stem.removeprefix("part-")) for p in self._part_files()]
        self._next_part = max(numbers, default=0) + 1

    def _part_files(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.parquet") if p.stem.removeprefix("part-").isdigit())

    def _read(self, path: Path, required: bool) -> pa.Table | None:
        """One file's rows in our schema but for the vector's dimension, which stays the file's. A main file that
        is not an index is an error (never overwrite someone's data); an unreadable part is skipped, its images are
        embedded again."""
        try:
            table = pq.read_table(path)
            if "path_bytes" not in table.column_names:  # written before names that are not UTF-8 were kept
                table = table.append_column("path_bytes", pa.nulls(table.num_rows, pa.binary()))
            if "fingerprint" not in table.column_names:  # written before fingerprints
                table = table.append_column("fingerprint", pa.nulls(table.num_rows, pa.string()))
            table = table.select(self.schema.names)
            vector = table.schema.field("vector").type
            if not pa.types.is_fixed_size_list(vector):
                raise ValueError(f"its vector column is {vector}")
            fields = [
                pa.field("vector", pa.list_(pa.float32(), vector.list_size)) if f.name == "vector" else f
                for f in self.schema
            ]
            return table.cast(pa.schema(fields))
        except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
            if required:
                raise IndexRefused(
                    f"{path} exists but is not an index this tool wrote ({exc}); choose another --out"
                ) from exc
            logger.warning("skipping unreadable checkpoint %s: %s", path, exc)
            return None

    def _foreign_space(self, table: pa.Table, dimension: int) -> tuple[str, str, str | None, int] | None:
        """(model, version, fingerprint, dimension) of rows (``table`` has at least their model and version, and a
        fingerprint where they have one) that are not of this index's space, if there are any."""
        if table.num_rows == 0:
            return None  # nothing to mix up
        fingerprints = (
            table.column("fingerprint").to_pylist() if "fingerprint" in table.column_names else [None] * table.num_rows
        )
        models, versions = table.column("model").to_pylist(), table.column("version").to_pylist()
        spaces = set(zip(models, versions, fingerprints, strict=True))
        ours = (self.model, self.version, self.fingerprint)
        foreign = sorted((space for space in spaces if not same_weights(space, ours)), key=str)
        if dimension == self.dimension and not foreign:
            return None
        model, version, fingerprint = (foreign or sorted(spaces, key=str))[0]
        return str(model), str(version), fingerprint, dimension

    def _mismatch(self, where: Path, found: tuple[str, str, str | None, int]) -> IndexMismatch:
        model, version, fingerprint, dimension = found
        if model == self.model and version == self.version and dimension == self.dimension:
            what = (
                f"{where} holds vectors of {model} version {version} made by other weights (fingerprint "
                f"{fingerprint}) than the ones {self.source} serves under that name (fingerprint {self.fingerprint})"
            )
        else:
            what = (
                f"{where} holds vectors of {model} version {version} ({dimension} dimensions), but {self.source} "
                f"serves {self.model} version {self.version} ({self.dimension} dimensions)"
            )
        return IndexMismatch(
            f"{what}; vectors of two models never go in one index: run again with --reindex to embed every image "
            f"anew and replace {self.out}, or choose another --out"
        )

    def check(self) -> None:
        """``IndexMismatch`` now if the main file or a part holds vectors of other weights, version or dimension
        and this is not a reindex. Quick: reads only schemas and the model and version columns (a file it cannot
        read this way is left to ``current_rows``)."""
        if self.reindex:
            return
        files = [(self.out, self.out)] if self.out.exists() else []
        files += [(part, self.parts_dir) for part in self._part_files()]
        for path, where in files:
            try:
                schema = pq.read_schema(path)
                columns = ["model", "version", *(["fingerprint"] if "fingerprint" in schema.names else [])]
                found = self._foreign_space(pq.read_table(path, columns=columns), schema.field("vector").type.list_size)
            except (pa.ArrowException, OSError, KeyError, AttributeError):
                continue
            if found is not None:
                raise self._mismatch(where, found)

    def _tables(self) -> list[pa.Table]:
        tables: list[pa.Table] = []
        self.replaced = 0
        if self.out.exists():
            main = self._read(self.out, required=True)
            assert main is not None
            found = self._foreign_space(main, main.schema.field("vector").type.list_size)
            if self.reindex:
                self.replaced = main.num_rows
            elif found is not None:
                raise self._mismatch(self.out, found)
            else:
                tables.append(main)
        for part in self._part_files():
            table = self._read(part, required=False)
            if table is None:
                continue
            found = self._foreign_space(table, table.schema.field("vector").type.list_size)
            if found is None:
                tables.append(table)
            elif not self.reindex:
                raise self._mismatch(self.parts_dir, found)
        return [table.cast(self.schema) for table in tables]

    def current_rows(self, photos: Sequence[PhotoFile], keep_under: Sequence[str] = ()) -> tuple[pa.Table, int]:
        """Rows (main file, then parts in order; the last row for a path wins) for files that still exist with the
        same size and mtime, and rows under the folders ``keep_under`` (rel paths of folders that could not be
        read: whether their files still exist is unknown), sorted by path; and how many indexed paths were dropped
        as stale."""
        table = pa.concat_tables(self._tables() or [self.schema.empty_table()])
        on_disk = {photo.rel: (photo.size, photo.mtime) for photo in photos}
        rels = [
            rel_of_row(path, raw)
            for path, raw in zip(table.column("path").to_pylist(), table.column("path_bytes").to_pylist(), strict=True)
        ]
        sizes = table.column("size").to_pylist()
        mtimes = table.column("mtime").to_pylist()
        prefixes = tuple(f"{folder}/" if folder else "" for folder in keep_under)
        last = {rel: row for row, rel in enumerate(rels)}
        keep = sorted(
            (
                row
                for row in last.values()
                if on_disk.get(rels[row]) == (sizes[row], mtimes[row]) or rels[row].startswith(prefixes)
            ),
            key=lambda row: rels[row],
        )
        return table.take(pa.array(keep, pa.int64())), len(last) - len(keep)

    def write_part(self, rows: Sequence[tuple[PhotoFile, np.ndarray]]) -> None:
        if not rows:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        vectors = np.stack([vector for _, vector in rows]).astype(np.float32)
        stored = [stored_path(photo.rel) for photo, _ in rows]
        table = pa.table(
            {
                "path": [path for path, _ in stored],
                "size": [photo.size for photo, _ in rows],
                "mtime": [photo.mtime for photo, _ in rows],
                "model": [self.model] * len(rows),
                "version": [self.version] * len(rows),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
                "path_bytes": [raw for _, raw in stored],
                "fingerprint": [self.fingerprint] * len(rows),
            },
            schema=self.schema,
        )
        write_parquet_atomically(table, self.parts_dir / f"part-{self._next_part:06d}.parquet")
        self._next_part += 1

    def merge(self, photos: Sequence[PhotoFile], keep_under: Sequence[str] = ()) -> pa.Table:
        """Main file + parts -> one new main file; parts are deleted only after the rename."""
        table, _ = self.current_rows(photos, keep_under)
        write_parquet_atomically(table, self.out)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return table


ChunkResult = tuple[list[tuple[PhotoFile, np.ndarray]], list[tuple[str, str]]]


def embed_chunk(client: EmbedClient, chunk: Sequence[PhotoFile], max_bytes: int | None = None) -> ChunkResult:
    """One request's worth of photos -> (rows, failures). Runs in a worker thread. Files are read with
    ``read_photo`` (``max_bytes``: default from the service's /info). An item error (400/413/...) fails the whole
    request, so the chunk is retried photo by photo to find the bad one and keep the rest."""
    limit = max_image_bytes(client.info()) if max_bytes is None else max_bytes
    readable: list[PhotoFile] = []
    datas: list[bytes] = []
    failed: list[tuple[str, str]] = []
    for photo in chunk:
        data = read_or_reason(photo.path, limit)
        if isinstance(data, str):
            failed.append((photo.shown, data))
        else:
            datas.append(data)
            readable.append(photo)
    if not readable:
        return [], failed
    try:
        vectors = client.embed_images(datas)
    except ServiceError as exc:
        if exc.status not in ITEM_ERROR_STATUSES:
            raise
        if len(readable) == 1:
            return [], [*failed, (readable[0].shown, exc.message)]
        rows: list[tuple[PhotoFile, np.ndarray]] = []
        for photo in readable:
            one_rows, one_failed = embed_chunk(client, [photo], limit)
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
    reindex: bool = False,
    follow_links: bool = False,
    warn: Callable[[str], None] | None = None,
) -> IndexSummary:
    """Embed every image under ``photo_dir`` not yet in ``out`` (same path, size and mtime; same weights and version)
    and write ``out`` anew. Finished work is checkpointed to ``OUT.parts/`` every ``checkpoint_rows`` rows or
    ``checkpoint_s`` seconds and on any interruption, so a rerun resumes. ``on_progress(images_done)`` is called
    after each chunk (tests use it to interrupt a run).

    Refuses, before writing anything: a service that does not embed images (``WrongService``), an output or
    checkpoints of other weights, version or dimension unless ``reindex`` (``IndexMismatch``; ``reindex`` embeds
    every image again and replaces the output), an output another run is writing (``OutputLocked``).
    ``warn(message)`` (default: the log) hears that the service runs a tiny random-weight model."""
    info = _image_service_info(client, warn or logger.warning)
    limit = max_image_bytes(info)
    # Resolved: a link to the output is written through (never replaced by a file) and locks the same output.
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked_output(out):
        index = ParquetIndex(
            out,
            str(info["model"]),
            str(info["version"]),
            int(info["dimension"]),
            fingerprint=info.get("fingerprint"),  # None from a service older than fingerprints
            reindex=reindex,
            source=client.url,
        )
        index.check()  # before the scan: a refusal should not wait for a large folder to be listed
        scan = scan_folder(photo_dir, follow_links)
        todo, summary = _plan(index, scan, limit)
        # One forward pass per request by default: with `concurrency` requests in flight the server's batcher stays
        # full, and a failed request (one corrupt file) costs little to redo image by image.
        size = max(1, min(chunk_size or client.max_batch_size, client.max_items_per_request))
        chunks = [todo[start : start + size] for start in range(0, len(todo), size)]
        runner = _ChunkRunner(client, index, summary, limit, checkpoint_rows, checkpoint_s, on_progress)
        runner.run(chunks, concurrency, progress)
        index.merge(scan.photos, scan.unreadable_folders)
    return summary


def _image_service_info(client: EmbedClient, warn: Callable[[str], None]) -> dict[str, Any]:
    """The service's /info, once it is ready and known to embed images; a tiny model is warned about."""
    info = client.info(refresh=True)
    if info.get("status") != "ok":
        raise ServiceUnreachable(f"{client.url} is not ready (status {info.get('status')!r})")
    client.require("image", point="--url")
    if info.get("tiny"):
        warn(
            f"{client.url} serves {info['model']}, a TINY model with RANDOM WEIGHTS (for tests): its vectors are "
            "meaningless, and so is any search on this index. Start the service with the real model to index."
        )
    return info


def _plan(index: ParquetIndex, scan: Scan, limit: int) -> tuple[list[PhotoFile], IndexSummary]:
    """The photos to embed (not indexed yet, not larger than the service takes), and the summary so far."""
    photos = scan.photos
    done, stale = index.current_rows(photos, scan.unreadable_folders)
    done_paths = set(
        rel_of_row(path, raw)
        for path, raw in zip(done.column("path").to_pylist(), done.column("path_bytes").to_pylist(), strict=True)
    )
    del done  # only the paths are needed now; merge() reads the vectors again
    todo = [photo for photo in photos if photo.rel not in done_paths]
    failed = [*scan.problems, *((p.shown, too_large_reason(p.size, limit)) for p in todo if p.size > limit)]
    summary = IndexSummary(
        files=len(photos),
        skipped=len(photos) - len(todo),
        removed=stale,
        replaced=index.replaced,
        failed=failed,
    )
    return [photo for photo in todo if photo.size <= limit], summary


@dataclass
class _ChunkRunner:
    """Sends chunks from a thread pool with a bounded number in flight; collects rows and checkpoints them on the
    main thread (the only one that writes files)."""

    client: EmbedClient
    index: ParquetIndex
    summary: IndexSummary
    max_bytes: int
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
                    pending.add(pool.submit(embed_chunk, self.client, chunk, self.max_bytes))
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
