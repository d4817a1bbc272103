"""Memory given back: host memory that glibc keeps once freed, and device memory that torch's caching allocator
keeps; and how running out of device memory shows (not only as ``torch.OutOfMemoryError``).

glibc keeps memory that Python, PIL or torch free in its arenas for reuse, so the process's RSS stays where its peak
was: after a large image decode, and after a model's weights are dropped. ``malloc_trim`` returns those pages. A
batch that does not fit in device memory is split and retried (``common.failures``); that only helps if what the
failed attempt held is released first, and the allocator's cache is handed back to the device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

import torch


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


def keep_out_of_collections() -> None:
    """Collect what is not frozen yet, then freeze what survives: once a model is loaded, the long-lived part of the
    process (the libraries, the model, the tokenizer: about 400,000 objects for the text service) stays out of the
    garbage collector's later passes. Every full collection walks all of it, on the event loop; frozen, the request
    path took a tenth or more less CPU (bench/RESULTS.md). Objects frozen earlier are not walked again
    (``gc.collect`` skips them), so this costs only what is new."""
    gc.collect()
    gc.freeze()


def collect_and_release() -> None:
    """Free what only reference cycles still hold (a dropped model's modules point at each other), then trim. What
    was frozen is unfrozen first, so that a model that was frozen and has been dropped since (put to sleep by
    unloading it) is collected like anything else, and what survives is frozen again."""
    gc.unfreeze()
    keep_out_of_collections()
    release_free_memory()


# Allocation failures that CUDA libraries report as a plain RuntimeError (a workspace that cuBLAS, cuDNN or cuFFT
# could not allocate, or the CUDA runtime's own "out of memory"): the same condition as torch.OutOfMemoryError, a
# batch too big, not a broken device.
OUT_OF_MEMORY_MESSAGES = (
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUFFT_ALLOC_FAILED",
    "MPS backend out of memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(message in str(error) for message in OUT_OF_MEMORY_MESSAGES)


def empty_device_cache(device: torch.device) -> None:
    """Hand the memory the caching allocator holds but no tensor uses back to the device (another attempt, or
    another process, can then have it)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def free_released_memory(device: torch.device) -> None:
    """Give what released weights held back: device memory to the driver (the caching allocator keeps it for this
    process otherwise) and host memory to the system (glibc keeps it otherwise)."""
    collect_and_release()
    empty_device_cache(device)
