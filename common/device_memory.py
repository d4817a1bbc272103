"""Running out of device memory: how it shows (not only as ``torch.OutOfMemoryError``) and giving memory back.

A batch that does not fit is split by the batcher and retried; that only helps if what the failed attempt held is
released first (see ``BatchedService``), and the allocator's cache is handed back to the device.
"""

from __future__ import annotations

import torch

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


class BatchOutOfMemory(RuntimeError):
    """A batch of several items did not fit in device memory: the batcher retries it in halves."""


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
