"""The output of a bulk import and how reruns, kills and compaction keep it consistent.

OUT_DIR/vectors/   a Parquet dataset with the standalone indexer's columns (path, size, mtime, model, version,
                   vector as a fixed-size float32 list): ``pq.read_table("OUT_DIR/vectors")`` reads it as one table
OUT_DIR/failures/  failures.parquet: path, size, mtime, reason of the files the last run could not embed

The scheme:

* vectors/ holds only files named ``part-RRRRRRRR-SSSSSSSS.parquet``: R is the run number (one more than the
  largest found), S counts within the run, so (R, S) orders the parts by age. Each is written under a dot-prefixed
  temporary name and renamed, so a part is whole or absent; Parquet dataset readers (pyarrow, Ray, Spark, DuckDB)
  skip dot-prefixed names, and a run deletes the ones a killed run left.
* While a run embeds, every block of vectors that reaches the driver becomes a new part at once: a killed run loses
  only the blocks still in flight.
* The state is read from all parts in (R, S) order, the last row for a path winning. A row counts while its path is
  in SOURCE with the same size and mtime, and was made by the same model and version.
* At the end of a run the parts are compacted: a part whose rows all count stays as it is (unless it is small and
  other parts are rewritten too); the rows that count from every other part are written into new parts of this run
  (they sort last), then the old parts are deleted. A kill during compaction leaves some rows twice, identical; the
  next run's compaction drops the extra copies. Until a run finishes, a reader may see a path twice.
* failures.parquet is replaced at the end of every run by that run's failures. Failed files never enter vectors/,
  so every run tries them again (an object that failed to read may read next time).

One run at a time per OUT_DIR: two runs writing the same OUT_DIR would delete each other's parts. A local OUT_DIR
is locked as the standalone indexer locks its output (``output_lock``); object storage has no such lock.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from cluster.source import BadLocation, SourceFile, filesystem_from_uri
from embed_client.indexer import index_schema, locked_output

logger = logging.getLogger(__name__)

_PART = re.compile(r"^part-(\d{8,})-(\d{8,})\.parquet$")
# About 230 MB of 1152-d vectors per part: few files for a reader, and compaction holds at most one part's rows.
ROWS_PER_PART = 50_000
KEY_COLUMNS = ["path", "size", "mtime", "model", "version"]
FAILURE_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("reason", pa.string())]
)


def _part_number(name: str) -> tuple[int, int]:
    """(run, sequence) of a part's name: the order in which its rows were written."""
    run, seq = name.removeprefix("part-").removesuffix(".parquet").split("-")
    return int(run), int(seq)


def local_path(out: str) -> Path | None:
    """OUT_DIR as an absolute local path (a plain path or a file:// URI), or None for object storage."""
    if "://" not in out:
        return Path(out).expanduser().resolve()
    filesystem, path = filesystem_from_uri(out)
    return Path(path) if isinstance(filesystem, pa_fs.LocalFileSystem) else None


@contextmanager
def output_lock(out: str) -> Iterator[None]:
    """Holds OUT_DIR for one run: a second run on the same local OUT_DIR raises ``OutputLocked`` before touching it
    (the lock file ``OUT_DIR.lock`` is the standalone indexer's, so a killed run never blocks the next). Object
    storage offers no lock: there, running one import at a time per OUT_DIR is up to the user."""
    root = local_path(out)
    if root is None:
        logger.info("%s is object storage, which has no lock: run one import at a time into it", out)
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked_output(root):
        yield


@dataclass(frozen=True)
class Plan:
    todo: list[SourceFile]  # to embed in this run
    skipped: int  # already in the output and still current
    indexed_paths: pa.Array  # paths a reader of the output saw before this run (for the "removed" count)


def listing_table(files: Sequence[SourceFile]) -> pa.Table:
    return pa.table(
        {
            "path": pa.array([f.rel for f in files], pa.string()),
            "size_now": pa.array([f.size for f in files], pa.int64()),
            "mtime_now": pa.array([f.mtime for f in files], pa.float64()),
        }
    )


class OutputStore:
    def __init__(self, out: str, model: str, version: str, rows_per_part: int = ROWS_PER_PART) -> None:
        if "://" in out:
            self.fs, root = filesystem_from_uri(out)
        else:
            self.fs, root = pa_fs.LocalFileSystem(), str(Path(out).expanduser().resolve())
        self.location = out if "://" in out else root  # for messages and the summary
        self.model = model
        self.version = version
        self.rows_per_part = rows_per_part
        self.vectors_dir = f"{root}/vectors"
        self.failures_dir = f"{root}/failures"
        for directory in (self.vectors_dir, self.failures_dir):
            self.fs.create_dir(directory, recursive=True)
            self._remove_temporary_files(directory)
        self.parts = self._list_parts()
        self.run = max((_part_number(name)[0] for name in self.parts), default=0) + 1
        self._next_seq = 1

    # -- files ----------------------------------------------------------------------------------------------------

    def _entries(self, directory: str) -> list[pa_fs.FileInfo]:
        return [i for i in self.fs.get_file_info(pa_fs.FileSelector(directory)) if i.type == pa_fs.FileType.File]

    def _remove_temporary_files(self, directory: str) -> None:
        for info in self._entries(directory):
            if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                self.fs.delete_file(info.path)

    def _list_parts(self) -> list[str]:
        names = [i.base_name for i in self._entries(self.vectors_dir) if not i.base_name.startswith(".")]
        foreign = [name for name in names if not _PART.match(name)]
        if foreign:
            # Never mix our rows with someone else's files, nor delete them during compaction.
            raise BadLocation(
                f"{self.vectors_dir} holds files this tool did not write ({', '.join(foreign[:3])}); "
                "choose another --out"
            )
        return sorted(names, key=_part_number)

    def _write(self, table: pa.Table, directory: str, name: str) -> None:
        """Whole or absent: write a dot-prefixed temporary file, flush it to disk where we can, rename."""
        tmp = f"{directory}/.{name}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as stream:
                pq.write_table(table, stream)
            if isinstance(self.fs, pa_fs.LocalFileSystem):
                descriptor = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
            self.fs.move(tmp, f"{directory}/{name}")
        except BaseException:
            if self.fs.get_file_info(tmp).type == pa_fs.FileType.File:
                self.fs.delete_file(tmp)
            raise

    def _new_part_name(self) -> str:
        name = f"part-{self.run:08d}-{self._next_seq:08d}.parquet"
        self._next_seq += 1
        return name

    # -- reading the state ----------------------------------------------------------------------------------------

    def _read_keys(self) -> pa.Table:
        """The key columns of every row of every part, with ``order``: part index << 32 | row number."""
        tables = []
        for index, name in enumerate(self.parts):
            try:
                keys = pq.read_table(f"{self.vectors_dir}/{name}", columns=KEY_COLUMNS, filesystem=self.fs)
            except (pa.ArrowException, OSError) as exc:
                # Cannot happen to a renamed part short of disk damage; its images are embedded again, and the
                # compaction deletes it (none of its rows count).
                logger.warning("ignoring unreadable part %s: %s", name, exc)
                continue
            order = (np.int64(index) << np.int64(32)) + np.arange(len(keys), dtype=np.int64)
            tables.append(keys.append_column("order", pa.array(order, pa.int64())))
        key_fields = [index_schema(1).field(name) for name in KEY_COLUMNS]
        empty = pa.schema([*key_fields, ("order", pa.int64())]).empty_table()
        return pa.concat_tables([empty, *tables], promote_options="permissive")

    @staticmethod
    def _winners(keys: pa.Table) -> pa.Table:
        """The last row of each path: what a reader that dedupes by path sees."""
        last = keys.group_by("path", use_threads=False).aggregate([("order", "max")])
        return keys.filter(pc.is_in(keys["order"], value_set=last["order_max"].combine_chunks()))

    def _current(self, winners: pa.Table, files: Sequence[SourceFile]) -> pa.Table:
        """Winning rows whose file is still in SOURCE unchanged, made by this model and version."""
        joined = winners.join(listing_table(files), keys="path", join_type="inner")
        same = pc.and_(
            pc.and_(pc.equal(joined["size"], joined["size_now"]), pc.equal(joined["mtime"], joined["mtime_now"])),
            pc.and_(pc.equal(joined["model"], self.model), pc.equal(joined["version"], self.version)),
        )
        return joined.filter(same)

    def plan(self, files: Sequence[SourceFile], reindex: bool) -> Plan:
        winners = self._winners(self._read_keys())
        current = set() if reindex else set(self._current(winners, files)["path"].to_pylist())
        todo = [f for f in files if f.rel not in current]
        return Plan(todo, len(files) - len(todo), winners["path"].combine_chunks())

    # -- writing --------------------------------------------------------------------------------------------------

    def write_rows(self, files: Sequence[SourceFile], vectors: np.ndarray) -> None:
        """One finished block of vectors (rows in the order of ``files``) -> one new part, at once."""
        if not files:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        table = pa.table(
            {
                "path": [f.rel for f in files],
                "size": [f.size for f in files],
                "mtime": [f.mtime for f in files],
                "model": [self.model] * len(files),
                "version": [self.version] * len(files),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
                # The standalone indexer's column for names that are not UTF-8; object storage keys always are.
                "path_bytes": pa.nulls(len(files), pa.binary()),
            },
            schema=index_schema(vectors.shape[1]),
        )
        name = self._new_part_name()
        self._write(table, self.vectors_dir, name)
        self.parts.append(name)

    def write_failures(self, failures: Sequence[tuple[SourceFile, str]]) -> None:
        table = pa.table(
            {
                "path": [f.rel for f, _ in failures],
                "size": [f.size for f, _ in failures],
                "mtime": [f.mtime for f, _ in failures],
                "reason": [reason for _, reason in failures],
            },
            schema=FAILURE_SCHEMA,
        )
        self._write(table, self.failures_dir, "failures.parquet")

    def compact(self, files: Sequence[SourceFile]) -> pa.Array:
        """Rewrite the parts that hold rows which no longer count (and the small ones, together); returns the paths
        of the output. See the module's docstring for why a kill at any point loses nothing."""
        keys = self._read_keys()
        current = self._current(self._winners(keys), files)
        counting_orders = current["order"].to_numpy()
        counting = np.bincount(counting_orders >> 32, minlength=len(self.parts))
        totals = np.bincount(keys["order"].to_numpy() >> 32, minlength=len(self.parts))
        # A part with no rows read (unreadable) is dirty too: compaction deletes it.
        dirty = {i for i in range(len(self.parts)) if counting[i] < totals[i] or totals[i] == 0}
        small = {i for i in range(len(self.parts)) if totals[i] < self.rows_per_part // 2}
        # Rewriting one small part that is otherwise clean would change nothing.
        rewrite = sorted(dirty | small) if len(dirty | small) > 1 else sorted(dirty)
        if rewrite:
            self._rewrite(rewrite, counting_orders)
        return current["path"].combine_chunks()

    def _rewrite(self, indexes: list[int], counting_orders: np.ndarray) -> None:
        """Copy the rows that count out of the parts ``indexes`` into new parts (at most rows_per_part rows each),
        then delete those parts."""
        part_of = counting_orders >> 32
        buffer: list[pa.Table] = []
        buffered = 0
        new_parts: list[str] = []
        for index in indexes:
            rows = np.sort(counting_orders[part_of == index] & 0xFFFFFFFF)
            if len(rows):
                table = pq.read_table(f"{self.vectors_dir}/{self.parts[index]}", filesystem=self.fs)
                buffer.append(table.take(pa.array(rows, pa.int64())))
                buffered += len(rows)
            while buffered >= self.rows_per_part:
                merged = pa.concat_tables(buffer)
                new_parts.append(self._flush(merged.slice(0, self.rows_per_part)))
                buffer = [merged.slice(self.rows_per_part)]
                buffered -= self.rows_per_part
        if buffered:
            new_parts.append(self._flush(pa.concat_tables(buffer)))
        replaced = {self.parts[i] for i in indexes}
        for name in sorted(replaced):  # only now: until here every row that counts is also in an old part
            self._delete_part(name)
        self.parts = [name for name in self.parts if name not in replaced] + new_parts

    def _delete_part(self, name: str) -> None:
        self.fs.delete_file(f"{self.vectors_dir}/{name}")

    def _flush(self, table: pa.Table) -> str:
        name = self._new_part_name()
        self._write(table, self.vectors_dir, name)
        return name
