"""What there is to embed: the image files under SOURCE, a local folder or any URI pyarrow reads (s3://, gs://,
file://, ...), with the size and mtime that decide whether a file is already indexed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pa_fs

from embed_client.files import IMAGE_EXTENSIONS, scan_folder


class BadLocation(ValueError):
    """SOURCE or OUT_DIR cannot be used: no such folder, an unknown URI scheme, someone else's files."""


@dataclass(frozen=True)
class SourceFile:
    # POSIX path relative to SOURCE, as the OS gives it (a local name that is not UTF-8 holds surrogate escapes, as
    # os.fsdecode gives it): the row's key, as the standalone indexer keys it.
    rel: str
    location: str  # the same file in the filesystem's own terms (a local path, the same way)
    size: int
    mtime: float


@dataclass
class Listing:
    files: list[SourceFile]  # sorted by rel
    # (path as shown, why): found but not taken, as the standalone indexer lists them (FIFOs, devices, links out
    # of SOURCE, broken links, folders that cannot be listed). Object storage has none.
    problems: list[tuple[str, str]] = field(default_factory=list)
    # rel paths of folders that could not be listed: their rows in the output are kept as they are.
    unreadable_folders: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    uri: str  # as the user gave it
    filesystem: pa_fs.FileSystem
    root: str  # SOURCE in the filesystem's terms (no scheme, no trailing slash)
    # A folder of this machine (a path or a file:// URI): walked and read by the standalone indexer's code, not
    # through pyarrow's listing and Ray's reader (which take names as text and read a file whole, whatever it is).
    is_local_folder: bool


def open_source(uri: str) -> Source:
    """A local folder (any path) or a URI; BadLocation if there is no such folder or prefix."""
    if "://" not in uri:
        folder = Path(uri).expanduser().resolve()
        if not folder.is_dir():
            raise BadLocation(f"{uri} is not a folder")
        return Source(uri, pa_fs.LocalFileSystem(), str(folder), is_local_folder=True)
    filesystem, root = filesystem_from_uri(uri)
    if filesystem.get_file_info(root).type != pa_fs.FileType.Directory:
        raise BadLocation(f"{uri} is not a folder or prefix that {filesystem.type_name} can list")
    return Source(uri, filesystem, root, is_local_folder=isinstance(filesystem, pa_fs.LocalFileSystem))


def filesystem_from_uri(uri: str) -> tuple[pa_fs.FileSystem, str]:
    """pyarrow's filesystem for a URI and the path in its terms, without a trailing slash."""
    try:
        filesystem, path = pa_fs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise BadLocation(f"{uri}: {exc}") from None
    return filesystem, path.rstrip("/")


def mtime_from_ns(ns: int) -> float:
    """The float os.stat() reports as st_mtime for a given st_mtime_ns (CPython computes sec + nsec * 1e-9, which can
    differ from ns / 1e9 in the last bit): a file seen through pyarrow and through os.stat gets the same key."""
    seconds, nanoseconds = divmod(ns, 1_000_000_000)
    return float(seconds) + nanoseconds * 1e-9


def list_images(source: Source) -> Listing:
    """Every image under SOURCE by extension (any case), sorted by relative path."""
    if source.is_local_folder:
        # The standalone indexer's own walker: the same files, the same mtimes, the same names (any bytes), links
        # and folders treated the same (pyarrow's local listing follows linked folders, and a link to a parent
        # folder would never end); the files are read by its reader too (cluster/pipeline.py).
        scan = scan_folder(Path(source.root))
        files = [SourceFile(p.rel, os.fsdecode(p.path), p.size, p.mtime) for p in scan.photos]
        return Listing(sorted(files, key=lambda f: f.rel), scan.problems, scan.unreadable_folders)
    infos = source.filesystem.get_file_info(pa_fs.FileSelector(source.root, recursive=True))
    files = [
        SourceFile(
            info.path[len(source.root) + 1 :],
            info.path,
            int(info.size or 0),
            mtime_from_ns(info.mtime_ns) if info.mtime_ns is not None else 0.0,
        )
        for info in infos
        if info.type == pa_fs.FileType.File and os.path.splitext(info.base_name)[1].lower() in IMAGE_EXTENSIONS
    ]
    return Listing(sorted(files, key=lambda f: f.rel))
