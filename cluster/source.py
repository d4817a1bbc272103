"""What there is to embed: the image files under SOURCE, a local folder or any URI pyarrow reads (s3://, gs://,
file://, ...), with the size and mtime that decide whether a file is already indexed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pa_fs

from embed_client.indexer import IMAGE_EXTENSIONS, scan_photos


class BadLocation(ValueError):
    """SOURCE or OUT_DIR cannot be used: no such folder, an unknown URI scheme, someone else's files."""


@dataclass(frozen=True)
class SourceFile:
    rel: str  # POSIX path relative to SOURCE: the row's key, as the standalone indexer writes it
    location: str  # the same file in the filesystem's own terms, as Ray's reader is given it
    size: int
    mtime: float


@dataclass(frozen=True)
class Source:
    uri: str  # as the user gave it
    filesystem: pa_fs.FileSystem
    root: str  # SOURCE in the filesystem's terms (no scheme, no trailing slash)

    @property
    def is_local_folder(self) -> bool:
        return "://" not in self.uri


def open_source(uri: str) -> Source:
    """A local folder (any path) or a URI; BadLocation if there is no such folder or prefix."""
    if "://" not in uri:
        folder = Path(uri).expanduser().resolve()
        if not folder.is_dir():
            raise BadLocation(f"{uri} is not a folder")
        return Source(uri, pa_fs.LocalFileSystem(), str(folder))
    filesystem, root = filesystem_from_uri(uri)
    if filesystem.get_file_info(root).type != pa_fs.FileType.Directory:
        raise BadLocation(f"{uri} is not a folder or prefix that {filesystem.type_name} can list")
    return Source(uri, filesystem, root)


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


def list_images(source: Source) -> list[SourceFile]:
    """Every image under SOURCE by extension (any case), sorted by relative path."""
    if source.is_local_folder:
        # The standalone indexer's own scan: the same files, the same mtimes, and symlinked folders not followed
        # (pyarrow's local listing follows them, and a link to a parent folder would never end).
        files = [SourceFile(p.rel, str(p.path), p.size, p.mtime) for p in scan_photos(Path(source.root))]
        return sorted(files, key=lambda f: f.rel)
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
    return sorted(files, key=lambda f: f.rel)


def unreadable(source: Source, files: list[SourceFile]) -> list[tuple[SourceFile, str]]:
    """Local files this process may not read. Ray's reader fails a whole read task (and so the job) on one such file,
    so they are reported as failures up front instead. Object stores have no such check: a read that still fails
    after Ray's retries stops the job, and a rerun carries on from what was written."""
    if not source.is_local_folder:
        return []
    return [(f, "cannot read the file: permission denied") for f in files if not os.access(f.location, os.R_OK)]
