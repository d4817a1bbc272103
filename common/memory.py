"""Giving freed host memory back to the operating system.

glibc keeps memory that Python, PIL or torch free in its arenas for reuse, so the process's RSS stays where its peak
was: after a large image decode, and after a model's weights are dropped. ``malloc_trim`` returns those pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable


def _load_malloc_trim() -> Callable[[int], int] | None:
    library = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(library).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Hand memory already freed back to the system: glibc serves PIL's 16 MB blocks from its arenas once it has
    seen a large free, and keeps them after they are freed (RSS stayed 370 MB above its start after one 100 MP RGBA
    decode)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def collect_and_release() -> None:
    """Free what only reference cycles still hold (a dropped model's modules point at each other), then trim."""
    gc.collect()
    release_free_memory()
