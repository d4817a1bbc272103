"""The decoding pool of a service that reads images: a request's images are decoded in threads, never on the event
loop, with three guarantees on top of the limits ``common.images`` checks in each header:

- images whose decode holds more than ``SMALL_IMAGE_PIXELS`` share a budget of ``max_decoded_pixels`` pixels being
  decoded at once: a large image waits for room on the event loop, holding no thread, so large images together
  never take more memory than the budget allows and small images never wait behind them;
- when one image of a request fails, or the request is cancelled (its client went away), the request's decodes that
  have not started never run, and running ones stop at their next read;
- memory a large decode took goes back to the operating system (glibc keeps freed memory in its arenas otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from common.contract import EncodedImage
from common.images import SMALL_IMAGE_PIXELS, ImageSpec, OpenedImage, finish_image, open_encoded_image
from common.memory import release_free_memory

logger = logging.getLogger(__name__)

T = TypeVar("T")


class PixelBudget:
    """Pixels of large images being decoded at once. ``acquire`` waits (first come, first served) until the pixels
    fit; nothing larger than the whole budget is ever asked for (``open_image`` refuses such an image)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, pixels: int) -> None:
        if not self._waiting and self.in_use + pixels <= self.capacity:
            self.in_use += pixels
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, granted)
        self._waiting.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(pixels)  # granted just as the waiter was cancelled: give the pixels back
            else:
                self._waiting.remove(entry)
                self._grant()  # a large waiter leaving may let smaller ones behind it in
            raise

    def release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            pixels, granted = self._waiting.popleft()
            self.in_use += pixels
            granted.set_result(None)


class DecodePool:
    """Decodes the images of requests (see the module docstring); one per service."""

    def __init__(self, spec: ImageSpec, max_image_bytes: int, threads: int) -> None:
        self.spec = spec
        self.max_image_bytes = max_image_bytes
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.budget = PixelBudget(spec.max_decoded_pixels)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def decode(self, images: Sequence[EncodedImage]) -> list[np.ndarray]:
        """The model inputs of one request's images, in order; the first failure is raised at once, and the rest of
        the request's decodes are called off."""
        cancelled = threading.Event()
        tasks = [asyncio.ensure_future(self._decode_one(item, cancelled)) for item in images]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # an image failed, or this request was cancelled
            cancelled.set()  # decodes already running stop at their next read
            for task in tasks:
                task.cancel()  # and queued ones never start (cancelling the task cancels its pool future)
            raise

    async def _decode_one(self, item: EncodedImage, cancelled: threading.Event) -> np.ndarray:
        opened = await self._run(open_encoded_image, item, self.spec, self.max_image_bytes, cancelled)
        if opened.pixels <= SMALL_IMAGE_PIXELS:
            return await self._run(finish_image, opened, self.spec, cancelled)
        # open_image refuses an image over the whole budget; the cap only guards against waiting forever.
        pixels = min(opened.pixels, self.budget.capacity)
        await self.budget.acquire(pixels)
        return await self._run(_finish_large_image, opened, self.spec, cancelled, release=pixels)

    def _run(self, fn: Callable[..., T], *args: object, release: int = 0) -> asyncio.Future[T]:
        """``fn(*args)`` in the pool; ``release`` pixels go back to the budget when it has finished, even if the
        request has stopped waiting for it (the memory is in use until then)."""
        try:
            future: Future[T] = self.executor.submit(fn, *args)
        except BaseException:
            if release:
                self.budget.release(release)
            raise
        if release:
            loop = asyncio.get_running_loop()

            def give_back(_: Future[T]) -> None:
                # RuntimeError: the event loop has closed, and nobody waits for the budget any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.budget.release, release)

            future.add_done_callback(give_back)
        return asyncio.wrap_future(future)


def _finish_large_image(opened: OpenedImage, spec: ImageSpec, cancelled: threading.Event) -> np.ndarray:
    try:
        return finish_image(opened, spec, cancelled)
    except BaseException as exc:
        _drop_frames(exc)
        raise
    finally:
        release_free_memory()


def _drop_frames(error: BaseException) -> None:
    """The frames of a failed decode (in the error's traceback and in those of the errors it was raised from) hold
    the decoded pixels: clear their variables, so that the pixels are freed now and trimmed right after."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__context__
