"""What a failing forward pass means, decided in one place for the services' batchers and the bulk import's actors:

- out of device memory (torch's error, or a CUDA library's allocation failure): a batch of several items is split
  in halves and each half retried (``BatchOutOfMemory``: a retry at the same size would fail again); a lone item
  that does not fit even alone is that item's 503 ``out_of_memory``; the allocator's cache is emptied first, once
  nothing of the failed pass is alive any more;
- a vector with NaN or infinity (a numerical overflow in the model): never returned, that item alone fails (500
  ``non_finite_vector``); the other rows of the pass are good (rows are computed independently), so the batch is
  not run again (``RowsFailed``);
- any other error: the caller's (the services count a lone item's failures in a row: a broken device).

``run_pass`` is one pass under this policy; the micro-batcher does the halving for the services, asynchronously and
per caller; ``run_in_halves`` does it synchronously for a caller without a batcher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from common.batching import RowsFailed
from common.errors import EmbedError, NonFiniteVector, OutOfMemory
from common.memory import empty_device_cache, is_out_of_memory

logger = logging.getLogger(__name__)

In = TypeVar("In")


class BatchOutOfMemory(RuntimeError):
    """A batch of several items did not fit in device memory: retry it in halves."""


def run_pass(
    run_batch: Callable[[list[In]], Sequence[Any] | np.ndarray], items: list[In], device: torch.device
) -> Sequence[Any] | np.ndarray:
    """``run_batch(items)``, or ``BatchOutOfMemory`` / ``OutOfMemory`` / ``RowsFailed`` as the module says; any other
    error as it is."""
    out_of_memory = ""
    try:
        result = run_batch(items)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        out_of_memory = f"{type(exc).__name__}: {exc}"  # only text: no reference to the error
    if out_of_memory:
        # Outside the except block: there the error's traceback would keep the failed forward pass's frames and
        # their activations alive, and emptying the cache could not give their memory back.
        empty_device_cache(device)
        if len(items) == 1:
            logger.warning("one item does not fit in device memory even alone (%s)", out_of_memory)
            raise OutOfMemory("one item does not fit in device memory; try a smaller input")
        raise BatchOutOfMemory(f"a batch of {len(items)} did not fit in device memory ({out_of_memory})")
    non_finite = non_finite_rows(result, len(items))
    if non_finite:
        raise RowsFailed(result, non_finite)
    return result


def run_in_halves(
    run_batch: Callable[[list[In]], Sequence[Any] | np.ndarray], items: list[In], device: torch.device
) -> tuple[list[Any], list[EmbedError | None]]:
    """Every item's output (None where it failed) and error (None where it did not), a batch that runs out of device
    memory split in halves until it fits, as the services' batcher does it."""
    try:
        return list(run_pass(run_batch, items, device)), [None] * len(items)
    except RowsFailed as partial:
        errors: list[EmbedError | None] = []
        for row in range(len(items)):
            error = partial.errors.get(row)
            errors.append(error if isinstance(error, EmbedError) or error is None else EmbedError(str(error)))
        return [None if error else output for output, error in zip(partial.outputs, errors, strict=True)], errors
    except OutOfMemory as alone:
        return [None], [alone]
    except BatchOutOfMemory:
        pass  # split below: outside the except block, which would keep this error's frames alive
    half = len(items) // 2
    first, first_errors = run_in_halves(run_batch, items[:half], device)
    second, second_errors = run_in_halves(run_batch, items[half:], device)
    return first + second, first_errors + second_errors


def non_finite_rows(result: Sequence[Any] | np.ndarray, count: int) -> dict[int, NonFiniteVector]:
    """A NonFiniteVector for each row of a batch's results (a matrix of vectors, or a list of arrays or tensors)
    that has NaN or infinity (a numerical overflow in the model): such a row must never reach a client or an index.
    Rows are computed independently, so only the inputs that overflow fail, each with its own request."""
    if isinstance(result, np.ndarray):
        if result.dtype.kind != "f":
            return {}
        bad = [int(row) for row in np.flatnonzero(~np.isfinite(result.reshape(count, -1)).all(axis=1))]
    else:
        bad = [row for row, value in enumerate(result) if not _all_finite(value)]
    if bad:
        logger.error("the model returned NaN or infinity in %d of %d results", len(bad), count)
    return {
        row: NonFiniteVector(
            "the model produced NaN or infinite values for this input (a numerical overflow in the model, not a "
            "fault of the request); no result was returned"
        )
        for row in bad
    }


def _all_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return bool(np.isfinite(value).all())
    return True
