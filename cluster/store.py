"""The output of a bulk import and how reruns, kills and compaction keep it consistent.

OUT_DIR                  a Parquet dataset of the vectors and nothing else, with the standalone indexer's columns
                         (path, size, mtime, model, version, vector as a fixed-size float32 list, path_bytes,
                         fingerprint):
                         ``pyarrow.dataset.dataset(OUT_DIR)``, ``pq.read_table(OUT_DIR)`` and ``pandas.read_parquet``
                         read exactly the vectors
OUT_DIR.failures.parquet path, path_bytes, size, mtime, reason of what the last run could not embed: beside OUT_DIR,
                         not in it, because every reader of OUT_DIR must see one schema (a glob such as DuckDB's
                         ``read_parquet('OUT_DIR/*.parquet')`` does not skip ``_`` names as pyarrow's discovery does)
OUT_DIR.lock             the lock of the run writing OUT_DIR (local OUT_DIRs only)

An OUT_DIR of the older layout (``OUT_DIR/vectors/`` and ``OUT_DIR/failures/``) is carried on: its parts are moved
up into OUT_DIR (a rename each, so a kill midway leaves every part in one place or the other and the next run
finishes the move) and the old failures file is dropped (every run writes its own).

The scheme:

* OUT_DIR holds only files named ``part-RRRRRRRR-SSSSSSSS.parquet``: R is the run number (one more than the
  largest found), S counts within the run, so (R, S) orders the parts by age. Each is written under a dot-prefixed
  temporary name and renamed, so a part is whole or absent; a run deletes the temporary files a killed run left.
  Anything else in OUT_DIR is someone else's: the run refuses to start rather than mix with it or delete it.
* While a run embeds, every block of vectors that reaches the driver becomes a new part at once: a killed run loses
  only the blocks still in flight.
* The state is read from all parts in (R, S) order, the last row for a path winning. A path is its exact bytes
  (``path_bytes`` where the name is not UTF-8, else ``path``), as the standalone indexer keys it. A row counts while
  its path is in SOURCE with the same size and mtime (or under a folder of SOURCE that could not be listed: kept as
  it is, as the indexer keeps it), and was made by the same weights and version (``same_weights``: by fingerprint,
  or by the model's name for rows written before fingerprints). Rows of other weights make a run refuse to start
  (``IndexMismatch``, as the standalone indexer's), unless it reindexes.
* At the end of a run the parts are compacted: a part whose rows all count stays as it is (unless it is small and
  other parts are rewritten too); the rows that count from every other part are written into new parts of this run
  (they sort last), then the old parts are deleted. A kill during compaction leaves some rows twice, identical; the
  next run's compaction drops the extra copies. Until a run finishes, a reader may see a path twice.
* The failures file is replaced at the end of every run by that run's failures. Failed files never enter the
  vectors, so every run tries them again (an object that failed to read may read next time).

One run at a time per OUT_DIR: two runs writing the same OUT_DIR would delete each other's parts. A local OUT_DIR
is locked as the standalone indexer locks its output (``output_lock``), on the folder's resolved path however it is
written (a link, a file:// URI); object storage has no such lock.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from cluster.source import BadLocation, SourceFile, filesystem_from_uri
from embed_client.files import stored_path
from embed_client.indexer import IndexMismatch, index_schema, locked_output

logger = logging.getLogger(__name__)

_PART = re.compile(r"^part-(\d{8,})-(\d{8,})\.parquet$")
# About 230 MB of 1152-d vectors per part: few files for a reader, and compaction holds at most one part's rows.
ROWS_PER_PART = 50_000
KEY_COLUMNS = ["path", "path_bytes", "size", "mtime", "model", "version", "fingerprint"]
FAILURE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # as the indexer shows it: bytes that are not UTF-8 as \xNN
        ("path_bytes", pa.binary()),  # the name's exact bytes where it is not UTF-8 (and known)
        ("size", pa.int64()),  # null for what was listed but never looked at as a file (a link, a folder)
        ("mtime", pa.float64()),
        ("reason", pa.string()),
    ]
)
# The folders of the older layout, carried on (see the module's docstring).
LEGACY_VECTORS, LEGACY_FAILURES = "vectors", "failures"


def _part_number(name: str) -> tuple[int, int]:
    """(run, sequence) of a part's name: the order in which its rows were written."""
    run, seq = name.removeprefix("part-").removesuffix(".parquet").split("-")
    return int(run), int(seq)


def local_path(out: str) -> Path | None:
    """OUT_DIR as an absolute local path with every link resolved (a plain path or a file:// URI), or None for
    object storage: one folder has one lock and one name however it is written."""
    if "://" not in out:
        return Path(out).expanduser().resolve()
    filesystem, path = filesystem_from_uri(out)
    return Path(path).resolve() if isinstance(filesystem, pa_fs.LocalFileSystem) else None


def _temporary(path: str) -> str:
    """Where ``path`` is written before it is renamed into place: beside it, dot-prefixed (readers skip it)."""
    directory, _, name = path.rpartition("/")
    return f"{directory}/.{name}.tmp"


def row_key(rel: str) -> bytes:
    """A path's identity in the output: its exact bytes, as the standalone indexer's ``rel_of_row`` restores them."""
    return os.fsencode(rel)


def _keys_of(table: pa.Table) -> pa.Array:
    """The exact bytes of each row's path: ``path_bytes`` where set, else ``path`` (valid UTF-8) as bytes."""
    path = pc.cast(table["path"], pa.binary())
    return pc.if_else(pc.is_null(table["path_bytes"]), path, table["path_bytes"]).combine_chunks()


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
    with ExitStack() as held:
        try:
            for folder in (root, *root.parents):  # the nearest that exists must be a folder
                if folder.exists():
                    if not folder.is_dir():
                        raise BadLocation(f"--out {out}: {folder} is a file, not a folder; choose another --out")
                    break
            root.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(locked_output(root))
        except OSError as exc:  # no permission, a read-only file system: one line, as a bad argument
            raise BadLocation(f"--out {out}: {exc.strerror or exc} ({exc.filename}); choose another --out") from None
        yield


@dataclass(frozen=True)
class Plan:
    todo: list[SourceFile]  # to embed in this run
    skipped: int  # already in the output and still current
    indexed_paths: pa.Array  # keys of the paths a reader of the output saw before this run (for "removed")


def listing_table(files: Sequence[SourceFile]) -> pa.Table:
    return pa.table(
        {
            "key": pa.array([row_key(f.rel) for f in files], pa.binary()),
            "size_now": pa.array([f.size for f in files], pa.int64()),
            "mtime_now": pa.array([f.mtime for f in files], pa.float64()),
        }
    )


def _stored_paths(rels: Sequence[str]) -> dict[str, pa.Array]:
    """The ``path`` and ``path_bytes`` columns for these relative paths, as the standalone indexer fills them."""
    stored = [stored_path(rel) for rel in rels]
    return {
        "path": pa.array([path for path, _ in stored], pa.string()),
        "path_bytes": pa.array([raw for _, raw in stored], pa.binary()),
    }


def with_fingerprint(table: pa.Table) -> pa.Table:
    """A part's rows with the fingerprint column: null in parts written before fingerprints."""
    if "fingerprint" in table.column_names:
        return table
    return table.append_column("fingerprint", pa.nulls(table.num_rows, pa.string()))


class OutputStore:
    def __init__(
        self, out: str, model: str, version: str, fingerprint: str | None = None, rows_per_part: int = ROWS_PER_PART
    ) -> None:
        local = local_path(out)
        if local is not None:  # resolved: the same folder and failures file however OUT_DIR is written
            self.fs, root = pa_fs.LocalFileSystem(), str(local)
        else:
            self.fs, root = filesystem_from_uri(out)
        # For messages and the summary: the URI as given, or the local path.
        self.location = out if "://" in out else root
        self.model = model
        self.version = version
        self.fingerprint = fingerprint
        self.rows_per_part = rows_per_part
        self._without_fingerprints: set[str] = set()  # parts written before fingerprints: compaction rewrites them
        self.root = root  # OUT_DIR: the parts of the vectors, nothing else
        self.failures_file = f"{root}.failures.parquet"
        self.failures_location = f"{out.rstrip('/')}.failures.parquet" if local is None else self.failures_file
        try:
            self.fs.create_dir(root, recursive=True)
        except OSError as exc:  # a file of that name, no permission (object storage: no such bucket, no access)
            raise BadLocation(f"--out {out}: cannot make the folder {root}: {exc}; choose another --out") from None
        self._remove_temporary_files(root)
        if self.fs.get_file_info(_temporary(self.failures_file)).type == pa_fs.FileType.File:
            self.fs.delete_file(_temporary(self.failures_file))  # left by a run killed while writing it
        self._check_own(root)
        self._carry_on_legacy_layout(root)
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

    def _check_own(self, root: str) -> None:
        """Never mix our rows with someone else's files, nor delete them during compaction: OUT_DIR (and the older
        layout's vectors folder) may hold only parts, dot-named files and the older layout's two folders."""

        def foreign(folder: str, allowed: Callable[[pa_fs.FileInfo], bool]) -> list[str]:
            return [
                info.path[len(root) + 1 :]
                for info in self.fs.get_file_info(pa_fs.FileSelector(folder))
                if not info.base_name.startswith(".") and not allowed(info)
            ]

        def is_part(info: pa_fs.FileInfo) -> bool:
            return info.type == pa_fs.FileType.File and _PART.match(info.base_name) is not None

        def is_legacy_folder(info: pa_fs.FileInfo) -> bool:
            return info.type == pa_fs.FileType.Directory and info.base_name in (LEGACY_VECTORS, LEGACY_FAILURES)

        found = foreign(root, lambda info: is_part(info) or is_legacy_folder(info))
        if self.fs.get_file_info(f"{root}/{LEGACY_VECTORS}").type == pa_fs.FileType.Directory:
            found += foreign(f"{root}/{LEGACY_VECTORS}", is_part)
        if self.fs.get_file_info(f"{root}/{LEGACY_FAILURES}").type == pa_fs.FileType.Directory:
            found += foreign(f"{root}/{LEGACY_FAILURES}", lambda info: info.base_name == "failures.parquet")
        if found:
            raise BadLocation(
                f"{root} holds files this tool did not write ({', '.join(found[:3])}); choose another --out"
            )

    def _carry_on_legacy_layout(self, root: str) -> None:
        """The older layout's parts move up into OUT_DIR (names are unique across both places: a rename each, and a
        run killed midway is finished by the next); its failures file is dropped, as every run writes its own."""
        legacy = f"{root}/{LEGACY_VECTORS}"
        if self.fs.get_file_info(legacy).type == pa_fs.FileType.Directory:
            moved = 0
            for info in self._entries(legacy):
                if _PART.match(info.base_name):
                    self.fs.move(info.path, f"{root}/{info.base_name}")
                    moved += 1
            self.fs.delete_dir(legacy)  # what is left: temporary files of a killed run
            logger.info("moved %d parts of the older layout from %s up into %s", moved, legacy, root)
        if self.fs.get_file_info(f"{root}/{LEGACY_FAILURES}").type == pa_fs.FileType.Directory:
            self.fs.delete_dir(f"{root}/{LEGACY_FAILURES}")

    def _list_parts(self) -> list[str]:
        names = [i.base_name for i in self._entries(self.root) if _PART.match(i.base_name)]
        return sorted(names, key=_part_number)

    def _write(self, table: pa.Table, path: str) -> None:
        """Whole or absent: write a dot-prefixed temporary file, flush it to disk where we can, rename."""
        tmp = _temporary(path)
        try:
            with self.fs.open_output_stream(tmp) as stream:
                pq.write_table(table, stream)
            if isinstance(self.fs, pa_fs.LocalFileSystem):
                descriptor = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
            self.fs.move(tmp, path)
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
                schema = pq.read_schema(f"{self.root}/{name}", filesystem=self.fs)
                columns = [column for column in KEY_COLUMNS if column in schema.names]
                keys = with_fingerprint(pq.read_table(f"{self.root}/{name}", columns=columns, filesystem=self.fs))
                if "fingerprint" not in schema.names:
                    self._without_fingerprints.add(name)
            except (pa.ArrowException, OSError) as exc:
                # Cannot happen to a renamed part short of disk damage; its images are embedded again, and the
                # compaction deletes it (none of its rows count).
                logger.warning("ignoring unreadable part %s: %s", name, exc)
                continue
            order = (np.int64(index) << np.int64(32)) + np.arange(len(keys), dtype=np.int64)
            keys = keys.append_column("key", _keys_of(keys)).drop_columns(["path", "path_bytes"])
            tables.append(keys.append_column("order", pa.array(order, pa.int64())))
        key_fields = [index_schema(1).field(name) for name in KEY_COLUMNS if not name.startswith("path")]
        empty = pa.schema([*key_fields, ("key", pa.binary()), ("order", pa.int64())]).empty_table()
        return pa.concat_tables([empty, *tables], promote_options="permissive")

    @staticmethod
    def _winners(keys: pa.Table) -> pa.Table:
        """The last row of each path: what a reader that dedupes by path sees."""
        last = keys.group_by("key", use_threads=False).aggregate([("order", "max")])
        return keys.filter(pc.is_in(keys["order"], value_set=last["order_max"].combine_chunks()))

    def _current(self, winners: pa.Table, files: Sequence[SourceFile], kept_folders: Sequence[str]) -> pa.Table:
        """Winning rows made by these weights and version whose file is still in SOURCE unchanged, or that lie under
        a folder of SOURCE that could not be listed (``kept_folders``, relative paths; whether their files still
        exist is unknown, so their rows are kept as they are, as the standalone indexer keeps them)."""
        listing = listing_table(files)
        joined = winners.join(listing, keys="key", join_type="left outer")
        ours = self._ours(joined)
        unchanged = pc.and_(
            pc.equal(joined["size"], joined["size_now"]), pc.equal(joined["mtime"], joined["mtime_now"])
        )
        keep = pc.fill_null(unchanged, False)
        for folder in kept_folders:
            prefix = row_key(folder) + b"/" if folder else b""
            unlisted = pc.is_null(joined["size_now"])
            keep = pc.or_(keep, pc.and_(unlisted, pc.starts_with(joined["key"], pattern=prefix)))
        return joined.filter(pc.and_(ours, keep))

    def _ours(self, rows: pa.Table) -> pa.Array:
        """Per row, whether it was made by these weights and version (the indexer's ``same_weights``, as a mask)."""
        same_version = pc.equal(rows["version"], self.version)
        by_name = pc.equal(rows["model"], self.model)
        if self.fingerprint is None:
            return pc.and_(same_version, by_name)
        by_fingerprint = pc.equal(rows["fingerprint"], self.fingerprint)
        return pc.and_(same_version, pc.if_else(pc.is_null(rows["fingerprint"]), by_name, by_fingerprint))

    def check_same_weights(self, winners: pa.Table) -> None:
        """``IndexMismatch`` when rows a reader sees were made by other weights (or another version)."""
        foreign = winners.filter(pc.invert(self._ours(winners)))
        if foreign.num_rows == 0:
            return
        row = foreign.slice(0, 1).to_pylist()[0]
        named = row["model"] == self.model and row["version"] == self.version
        what = (
            f"made by other weights (fingerprint {row['fingerprint']}) than this model of that name "
            f"(fingerprint {self.fingerprint})"
            if named
            else f"not those of {self.model} version {self.version}"
        )
        raise IndexMismatch(
            f"{self.location} holds {foreign.num_rows} vectors of {row['model']} version {row['version']}, {what}; "
            "vectors of two models never go in one output: run again with --reindex to embed every image anew, "
            "or choose another OUT_DIR"
        )

    def plan(self, files: Sequence[SourceFile], reindex: bool, kept_folders: Sequence[str] = ()) -> Plan:
        winners = self._winners(self._read_keys())
        if not reindex:
            self.check_same_weights(winners)
        current = set() if reindex else set(self._current(winners, files, kept_folders)["key"].to_pylist())
        todo = [f for f in files if row_key(f.rel) not in current]
        return Plan(todo, len(files) - len(todo), winners["key"].combine_chunks())

    # -- writing --------------------------------------------------------------------------------------------------

    def write_rows(self, files: Sequence[SourceFile], vectors: np.ndarray) -> None:
        """One finished block of vectors (rows in the order of ``files``) -> one new part, at once."""
        if not files:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        paths = _stored_paths([f.rel for f in files])
        table = pa.table(
            {
                "path": paths["path"],
                "size": [f.size for f in files],
                "mtime": [f.mtime for f in files],
                "model": [self.model] * len(files),
                "version": [self.version] * len(files),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
                "path_bytes": paths["path_bytes"],
                "fingerprint": [self.fingerprint] * len(files),
            },
            schema=index_schema(vectors.shape[1]),
        )
        name = self._new_part_name()
        self._write(table, f"{self.root}/{name}")
        self.parts.append(name)

    def write_failures(
        self, failures: Sequence[tuple[SourceFile, str]], listed: Sequence[tuple[str, str]] = ()
    ) -> None:
        """This run's failures: files that could not be embedded, and what the listing found but did not take
        (``listed``: (path as shown, why), as the standalone indexer reports them)."""
        paths = _stored_paths([f.rel for f, _ in failures])
        table = pa.table(
            {
                "path": pa.concat_arrays([paths["path"], pa.array([shown for shown, _ in listed], pa.string())]),
                "path_bytes": pa.concat_arrays([paths["path_bytes"], pa.nulls(len(listed), pa.binary())]),
                "size": [f.size for f, _ in failures] + [None] * len(listed),
                "mtime": [f.mtime for f, _ in failures] + [None] * len(listed),
                "reason": [reason for _, reason in failures] + [reason for _, reason in listed],
            },
            schema=FAILURE_SCHEMA,
        )
        self._write(table, self.failures_file)

    def compact(self, files: Sequence[SourceFile], kept_folders: Sequence[str] = ()) -> pa.Array:
        """Rewrite the parts that hold rows which no longer count (and the small ones, together); returns the keys
        of the output's paths. See the module's docstring for why a kill at any point loses nothing."""
        keys = self._read_keys()
        current = self._current(self._winners(keys), files, kept_folders)
        counting_orders = current["order"].to_numpy()
        counting = np.bincount(counting_orders >> 32, minlength=len(self.parts))
        totals = np.bincount(keys["order"].to_numpy() >> 32, minlength=len(self.parts))
        # A part with no rows read (unreadable) is dirty too: compaction deletes it. So is one written before
        # fingerprints: rewritten with the column (null), every part of OUT_DIR has one schema.
        dirty = {i for i in range(len(self.parts)) if counting[i] < totals[i] or totals[i] == 0}
        dirty |= {i for i, name in enumerate(self.parts) if name in self._without_fingerprints}
        small = {i for i in range(len(self.parts)) if totals[i] < self.rows_per_part // 2}
        # Rewriting one small part that is otherwise clean would change nothing.
        rewrite = sorted(dirty | small) if len(dirty | small) > 1 else sorted(dirty)
        if rewrite:
            self._rewrite(rewrite, counting_orders)
        return current["key"].combine_chunks()

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
                table = with_fingerprint(pq.read_table(f"{self.root}/{self.parts[index]}", filesystem=self.fs))
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
        self.fs.delete_file(f"{self.root}/{name}")

    def _flush(self, table: pa.Table) -> str:
        name = self._new_part_name()
        self._write(table, f"{self.root}/{name}")
        return name
