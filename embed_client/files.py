"""Finding and reading image files under a folder: the one walker and reader of the standalone indexer and of the
Ray import, so both take the same files, read them the same way and key them the same way.

Only regular files are read, and never more than a limit checked on the open file before reading: FIFOs, devices
and links out of the folder (unless ``follow_links``) are listed, not read. File names that are not UTF-8 are kept
losslessly: ``rel`` holds them as the OS gives them (surrogate escapes), a stored row shows them with ``\\xNN``
escapes in ``path`` and holds their bytes in ``path_bytes``."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

# What the indexer and the import embed (compared lower-case); HEIC/HEIF/AVIF decode on the server through pillow-heif.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)


@dataclass(frozen=True)
class PhotoFile:
    # Path relative to the photo folder, "/"-separated, as the OS gives it (bytes that are not UTF-8 become
    # surrogate escapes, as in os.fsdecode): the row's key.
    rel: str
    path: Path
    size: int
    mtime: float

    @property
    def shown(self) -> str:
        return shown_path(self.rel)


def shown_path(rel: str) -> str:
    """``rel`` as text any file or terminal takes: bytes of the name that are not UTF-8 written as ``\\xNN``."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def stored_path(rel: str) -> tuple[str, bytes | None]:
    """The ``path`` and ``path_bytes`` columns of a row: the name as text and, only when the name is not valid
    UTF-8 (and ``path`` therefore shows it with ``\\xNN`` escapes), its exact bytes."""
    raw = os.fsencode(rel)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def rel_of_row(path: str, path_bytes: bytes | None) -> str:
    return os.fsdecode(path_bytes) if path_bytes is not None else path


@dataclass
class Scan:
    photos: list[PhotoFile] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path as shown, why): listed, not read
    unreadable_folders: list[str] = field(default_factory=list)  # rel paths; their rows are kept as they are


def _kind(mode: int) -> str:
    kinds = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a file")


def not_regular_reason(mode: int) -> str:
    return f"not a regular file: {_kind(mode)}; not read"


def too_large_reason(size: int, max_bytes: int) -> str:
    return f"{size} bytes, more than the service takes (limits.max_image_bytes={max_bytes}); not read"


def scan_folder(root: Path, follow_links: bool = False) -> Scan:
    """Every image under ``root`` by extension, sorted, with size and mtime, and what was not taken and why.

    Only regular files are taken. A link to a file or folder inside ``root`` is taken as the file (folders: not
    entered; their images are found where they are). A link out of ``root`` is listed and not followed unless
    ``follow_links``; then folders are entered once each (no loops). Folders that cannot be listed are listed.
    Files that vanish while scanning are left out."""
    walk = _Walk(os.fspath(root), follow_links)
    for folder, dirs, names in os.walk(walk.top, onerror=walk.folder_error, followlinks=follow_links):
        walk.visit(folder)
        dirs[:] = [name for name in sorted(dirs) if walk.enters(os.path.join(folder, name))]
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                walk.take(os.path.join(folder, name))
    return walk.scan


class _Walk:
    """The state of one ``scan_folder``: what was found, and the folders already entered."""

    def __init__(self, top: str, follow_links: bool) -> None:
        self.top = top
        self.real_top = os.path.realpath(top)
        self.follow_links = follow_links
        self.scan = Scan()
        self.visited: set[tuple[int, int]] = set()

    def rel_of(self, path: str) -> str:
        rel = os.path.relpath(path, self.top)
        return "" if rel == "." else rel.replace(os.sep, "/")

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_top or real.startswith(self.real_top.rstrip("/") + "/")

    def not_followed(self, path: str, shown: str) -> None:
        try:
            target = shown_path(os.readlink(path))
        except OSError:
            target = "?"
        self.scan.problems.append(
            (shown, f"a link out of the folder (to {target}); not followed (--follow-links does)")
        )

    def folder_error(self, error: OSError) -> None:
        rel = self.rel_of(os.fsdecode(error.filename)) if error.filename is not None else ""
        self.scan.unreadable_folders.append(rel)
        self.scan.problems.append((shown_path(rel or ".") + "/", f"cannot read the folder: {error.strerror or error}"))

    def visit(self, folder: str) -> None:
        try:
            here = os.stat(folder)
            self.visited.add((here.st_dev, here.st_ino))
        except OSError:
            pass

    def enters(self, path: str) -> bool:
        """Whether the walk goes into the subfolder ``path``: not a link inside the top (its images are found under
        their own path), a link out of it only when following links, and no folder twice (loops)."""
        if os.path.islink(path):
            if self.inside(path):
                return False
            if not self.follow_links:
                self.not_followed(path, shown_path(self.rel_of(path)) + "/")
                return False
        try:
            there = os.stat(path)
        except OSError:
            return False
        return (there.st_dev, there.st_ino) not in self.visited

    def take(self, path: str) -> None:
        """An image file (by its extension): taken if it is a regular file, else listed with why not."""
        rel = self.rel_of(path)
        try:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                if not self.follow_links and not self.inside(path):
                    self.not_followed(path, shown_path(rel))
                    return
                try:
                    info = os.stat(path)
                except FileNotFoundError:
                    self.scan.problems.append((shown_path(rel), f"a broken link (to {shown_path(os.readlink(path))})"))
                    return
        except FileNotFoundError:
            return  # deleted while scanning
        except OSError as exc:
            self.scan.problems.append((shown_path(rel), f"cannot read the file: {exc.strerror or exc}"))
            return
        if not stat.S_ISREG(info.st_mode):
            self.scan.problems.append((shown_path(rel), not_regular_reason(info.st_mode)))
            return
        self.scan.photos.append(PhotoFile(rel, Path(path), info.st_size, info.st_mtime))


def scan_photos(root: Path, follow_links: bool = False) -> list[PhotoFile]:
    """The images ``scan_folder`` takes (what it does not take, and why, is in its ``Scan``)."""
    return scan_folder(root, follow_links).photos


class NotTaken(OSError):
    """A file that is not read: not (or no longer) a regular file, or larger than the service takes."""


def read_photo(path: Path, max_bytes: int) -> bytes:
    """The file's bytes if it is a regular file of at most ``max_bytes``; ``NotTaken`` (an OSError) otherwise.
    Opened without blocking (a FIFO put in a file's place never hangs the run) and checked on the open file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotTaken(not_regular_reason(info.st_mode))
        if info.st_size > max_bytes:
            raise NotTaken(too_large_reason(info.st_size, max_bytes))
        os.set_blocking(fd, True)  # a regular file: plain reads from here on
        chunks, total = [], 0
        while total <= max_bytes:  # the file may grow while it is read
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise NotTaken(too_large_reason(total, max_bytes))
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_or_reason(path: Path, max_bytes: int) -> bytes | str:
    """``read_photo``'s bytes, or why the file was not read (a row of the failures; never an exception): the message
    the indexer and the import both report."""
    try:
        return read_photo(path, max_bytes)
    except NotTaken as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"
