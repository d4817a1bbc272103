"""Where a model's weights are: on the device and serving, or released so that another program (an image
generator on the same card) can have the memory. One ``Residency`` per loaded model owns that state:

- ``awake``: the weights are in place and requests are served;
- ``asleep``: the weights are released (``offload``: moved to host memory; ``unload``: dropped); the next request
  wakes the model and is then served as usual;
- ``waking``: the weights are being restored; every request that arrives meanwhile waits for this one wake
  (bounded by the request timeout) instead of starting another;
- ``held``: asleep on demand; requests are answered at once with 503 ``asleep`` and Retry-After (which the client
  and the indexer retry) until ``wake``.

The model sleeps after ``idle_sleep_s`` without a request waiting or running, or when asked (``sleep``). A sleep
first lets the requests already admitted finish (requests that arrive meanwhile wait for it, then wake the model
again, unless it is held), then releases the weights on the model's one worker thread, so that a release or a
restore never races a forward pass. A wake that fails (the card is full, the folder is gone) leaves the model
asleep, answers its waiting requests with 503, and the next request tries again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar, get_args

import torch
from pydantic import BaseModel

from common.errors import Asleep, EmbedError, ModelChanged, NotReady, OutOfMemory, RequestTimeout
from common.identity import weights_fingerprint
from common.memory import free_released_memory

logger = logging.getLogger(__name__)

State = Literal["awake", "asleep", "waking", "held"]
STATES: tuple[State, ...] = get_args(State)
SleepMode = Literal["offload", "unload"]
# Why the model went to sleep (idle, admin) or woke up (request, admin).
Reason = Literal["idle", "request", "admin"]
Event = Literal["sleep", "wake"]
# (event, reason, seconds it took): the metrics' hook.
ResidencyObserver = Callable[[Event, Reason, float], None]

# What a client is told to wait while the model is held asleep: a hold lasts as long as a generation job, so polling
# more often would only add requests; the client and the indexer retry after it.
HOLD_RETRY_AFTER_S = 5
# ... and after a wake that failed (the generator may still hold the card).
FAILED_WAKE_RETRY_AFTER_S = 5


def pick_sleep_mode(requested: Literal["auto", "offload", "unload"], device: torch.device) -> SleepMode:
    """``auto``: offload on CUDA (waking is then a copy from host memory, not a load), unload elsewhere: on the CPU
    the weights already live in host memory, and moving them there would free nothing."""
    if requested != "auto":
        return requested
    return "offload" if device.type == "cuda" else "unload"


class Releasable(Protocol):
    """What an encoder does to sleep and wake: pure, blocking, called on the model's worker thread only."""

    def release_weights(self, mode: SleepMode) -> None: ...

    def restore_weights(self, mode: SleepMode) -> None: ...


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class SwappableWeights(Generic[ModuleT]):
    """For an encoder whose weights are one module, ``self.model``, built by ``load_model()`` (the same code at
    start-up and on a wake after ``unload``). The encoder's other state (tokenizer, preprocessing) stays. A wake
    after ``unload`` reads the folders again: it first checks that they hold the weights loaded at start
    (``fingerprint``), because another checkpoint may have been put there since (the image generator's folder,
    updated) and would otherwise be served under this model's name and version."""

    device: torch.device
    model: ModuleT
    fingerprint: str  # of the weight folders, when the model was loaded at start (common.identity)
    compile_model: bool  # torch.compile'd: a model loaded anew compiles its graphs in warm_up, not on a request

    def load_model(self) -> ModuleT:
        raise NotImplementedError

    def warm_up(self) -> None:
        raise NotImplementedError

    def weight_folders(self) -> list[Path]:
        """The folders the model is read from, as ``common.identity.weights_fingerprint`` takes them."""
        raise NotImplementedError

    def check_unchanged(self) -> None:
        """``ModelChanged`` when the folders no longer hold the weights loaded at start."""
        now = weights_fingerprint(self.weight_folders())
        if now != self.fingerprint:
            folders = ", ".join(str(folder) for folder in self.weight_folders())
            raise ModelChanged(
                f"the model's folder ({folders}) holds other weights than the ones this service loaded at start "
                f"(fingerprint {now}, not {self.fingerprint}): it serves nothing rather than their vectors under "
                "the old name and version. Restart the service to serve the new weights (under their own identity), "
                "or put the old ones back"
            )

    def release_weights(self, mode: SleepMode) -> None:
        """Idempotent: a failed restore calls it again to leave nothing half on the device."""
        if hasattr(self, "model"):
            if mode == "offload":
                offload_to_host(self.model, pin=self.device.type == "cuda")
            else:
                del self.model
        free_released_memory(self.device)

    def restore_weights(self, mode: SleepMode) -> None:
        if mode == "offload":
            self.model.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.accelerator.empty_host_cache()  # the pinned host copies, kept by torch's host cache otherwise
        else:
            self.check_unchanged()
            self.model = self.load_model()
            if self.compile_model:
                self.warm_up()


def offload_to_host(module: torch.nn.Module, pin: bool) -> None:
    """Every parameter and buffer of ``module`` to host memory, in page-locked memory when ``pin`` (a wake then
    copies at the bus's full speed), one tensor at a time (never a second copy of the whole model)."""
    if pin:
        module._apply(lambda tensor: tensor.to("cpu").pin_memory())
    else:
        module.to("cpu")


@dataclass(frozen=True)
class Transition:
    """The answer of a sleep or a wake on demand: the state now, and the seconds the call took."""

    state: State
    seconds: float


class SleepInfo(BaseModel):
    """What /info says about sleeping."""

    state: State
    mode: SleepMode
    idle_sleep_s: float
    last_wake_s: float | None
    sleeps: int
    wakes: int


class Residency:
    def __init__(
        self, weights: Releasable, executor: Executor, *, mode: SleepMode, idle_sleep_s: float, timeout_s: float
    ) -> None:
        self.weights = weights
        self.executor = executor
        self.mode = mode
        self.idle_sleep_s = idle_sleep_s
        self.timeout_s = timeout_s
        self.observer: ResidencyObserver | None = None
        self.last_wake_s: float | None = None
        self.sleeps = 0
        self.wakes = 0
        self._resident: Literal["awake", "asleep", "waking"] = "awake"
        self._held = False
        self._stopped = False  # no idle sleeps once the service stops
        self._admitted = 0  # requests past the gate: their work may be queued for the model or on it
        self._waiting = 0  # requests at the gate, waiting for a sleep to end or a wake
        self._transition = asyncio.Lock()  # one sleep or wake at a time
        self._falling_asleep: asyncio.Future[None] | None = None
        self._drained: asyncio.Event | None = None
        self._wake_task: asyncio.Task[None] | None = None
        self._sleep_task: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[Transition] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def state(self) -> State:
        return "held" if self._held else self._resident

    def info(self) -> SleepInfo:
        return SleepInfo(
            state=self.state,
            mode=self.mode,
            idle_sleep_s=self.idle_sleep_s,
            last_wake_s=None if self.last_wake_s is None else round(self.last_wake_s, 3),
            sleeps=self.sleeps,
            wakes=self.wakes,
        )

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arm_idle_timer()

    async def stop(self) -> None:
        """No more idle sleeps; a sleep or wake under way finishes (it runs on the model's thread, which the
        service's stop waits for anyway)."""
        self._stopped = True
        self._cancel_idle_timer()
        pending = [task for task in (self._wake_task, self._sleep_task, self._idle_task) if task is not None]
        await asyncio.gather(*pending, return_exceptions=True)

    # -- the gate every request passes ----------------------------------------------------------------------------

    @asynccontextmanager
    async def in_use(self) -> AsyncIterator[None]:
        """Around a request's work on the model: waits until the model is awake (waking it if need be), and keeps
        the idle timer off until the work is done."""
        self._waiting += 1
        self._cancel_idle_timer()
        try:
            await self._admit()
        except BaseException:
            self._waiting -= 1
            self._arm_idle_timer()
            raise
        self._waiting -= 1
        self._admitted += 1  # no await since the check in _admit: no sleep can have begun in between
        try:
            yield
        finally:
            self._admitted -= 1
            if self._admitted == 0 and self._drained is not None:
                self._drained.set()
            self._arm_idle_timer()

    async def _admit(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            if self._held:
                raise self._asleep_error()
            if self._falling_asleep is not None:
                await self._wait(self._falling_asleep, deadline)
            elif self._resident == "awake":
                return
            else:
                await self._wait(self._start_wake("request"), deadline)

    async def _wait(self, awaitable: Awaitable[None], deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(awaitable)
        except TimeoutError:
            raise RequestTimeout(
                f"the model did not wake within {self.timeout_s:g} s (request_timeout_s); retry shortly",
                headers={"Retry-After": "5"},
            ) from None

    @staticmethod
    def _asleep_error() -> Asleep:
        return Asleep(
            "the model is held asleep (the GPU is lent to another program) until POST /admin/wake; "
            f"retry in {HOLD_RETRY_AFTER_S} s",
            headers={"Retry-After": str(HOLD_RETRY_AFTER_S)},
        )

    # -- sleeping -------------------------------------------------------------------------------------------------

    async def sleep(self, reason: Reason, hold: bool = False) -> Transition:
        """Release the weights once the requests already admitted are done; ``hold``: and refuse requests (503
        ``asleep``) from now until ``wake``. Already asleep: only the hold changes. A sleep, once asked for, runs to
        its end even if the caller goes away (a client that times out): cancelled half-way, the weights would be
        gone while the state still said awake."""
        started = time.perf_counter()
        if hold:
            self._held = True
        await asyncio.shield(self._start_sleep(reason))
        return Transition(self.state, time.perf_counter() - started)

    def _start_sleep(self, reason: Reason) -> asyncio.Task[None]:
        """The one sleep under way, started if there is none: callers at the same time share it."""
        if self._sleep_task is None:
            self._sleep_task = asyncio.create_task(self._sleep_once(reason), name="sleep-model")
            self._sleep_task.add_done_callback(self._sleep_ended)
        return self._sleep_task

    async def _sleep_once(self, reason: Reason) -> None:
        async with self._transition:
            if self._resident == "awake":
                await self._fall_asleep(reason)

    def _sleep_ended(self, task: asyncio.Task[None]) -> None:
        self._sleep_task = None
        if not task.cancelled():
            task.exception()  # seen by the callers still waiting, if any; retrieved here in case none are

    async def _fall_asleep(self, reason: Reason) -> None:
        loop = asyncio.get_running_loop()
        self._falling_asleep = loop.create_future()
        self._cancel_idle_timer()
        try:
            started = time.perf_counter()
            while self._admitted:
                self._drained = asyncio.Event()
                await self._drained.wait()
            self._drained = None
            try:
                await loop.run_in_executor(self.executor, self._release)
            except Exception as exc:
                self._held = False
                logger.exception("putting the model to sleep failed; it stays awake")
                raise NotReady(f"putting the model to sleep failed ({type(exc).__name__}); see the log") from exc
            self._resident = "asleep"
            seconds = time.perf_counter() - started
            self.sleeps += 1
            if self.observer is not None:
                self.observer("sleep", reason, seconds)
            logger.info("model asleep (%s, %s%s) in %.2f s", reason, self.mode, ", held" if self._held else "", seconds)
        finally:
            self._falling_asleep.set_result(None)
            self._falling_asleep = None

    def _release(self) -> None:
        """On the model's thread. A release that fails half-way puts the weights back, so the model can serve."""
        try:
            self.weights.release_weights(self.mode)
        except BaseException:
            self.weights.restore_weights(self.mode)
            raise

    # -- waking ---------------------------------------------------------------------------------------------------

    async def wake(self) -> Transition:
        """End a hold and wake the model now; returns once it serves (or raises the wake's 503)."""
        started = time.perf_counter()
        self._held = False
        if self._falling_asleep is not None:
            await asyncio.shield(self._falling_asleep)
        if self._resident != "awake":
            await asyncio.shield(self._start_wake("admin"))
        self._arm_idle_timer()
        return Transition(self.state, time.perf_counter() - started)

    def _start_wake(self, reason: Reason) -> asyncio.Task[None]:
        """The one wake under way, started if there is none: a burst of requests shares it."""
        if self._wake_task is None:
            self._wake_task = asyncio.create_task(self._wake(reason), name="wake-model")
            self._wake_task.add_done_callback(self._wake_ended)
        return self._wake_task

    def _wake_ended(self, task: asyncio.Task[None]) -> None:
        self._wake_task = None  # runs before the waiters resume: the next request after a failure tries again
        if not task.cancelled():
            task.exception()  # seen by the waiters, if any are left; retrieved here in case none are

    async def _wake(self, reason: Reason) -> None:
        async with self._transition:
            if self._resident == "awake":
                return
            if self._held and reason != "admin":
                raise self._asleep_error()
            self._resident = "waking"
            started = time.perf_counter()
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self._restore)
            except ModelChanged as changed:
                self._resident = "asleep"
                logger.error("waking the model failed; it stays asleep: %s", changed.message)
                raise  # as it is: no Retry-After, retrying does not help until a restart
            except Exception as exc:
                self._resident = "asleep"
                raise self._wake_error(exc) from exc
            except BaseException:
                self._resident = "asleep"
                raise
            seconds = time.perf_counter() - started
            self._resident = "awake"
            self.last_wake_s = seconds
            self.wakes += 1
            if self.observer is not None:
                self.observer("wake", reason, seconds)
            logger.info("model awake (%s, %s) in %.2f s", reason, self.mode, seconds)

    def _restore(self) -> None:
        """On the model's thread. A restore that fails is undone: nothing is left half on the device."""
        try:
            self.weights.restore_weights(self.mode)
        except BaseException:
            self.weights.release_weights(self.mode)
            raise
        # A reloaded model joins what later collections leave alone, as at start-up (common.memory); without a
        # collection first, which would lengthen the wake: what the wake left is collected at the next sleep.
        gc.freeze()

    @staticmethod
    def _wake_error(exc: Exception) -> EmbedError:
        retry = {"Retry-After": str(FAILED_WAKE_RETRY_AFTER_S)}
        if isinstance(exc, torch.OutOfMemoryError):
            logger.error("waking the model failed: the device is out of memory (%s); it stays asleep", exc)
            return OutOfMemory(
                "waking the model failed: the device is out of memory (another program holds it); retry shortly",
                headers=retry,
            )
        logger.error("waking the model failed; it stays asleep and the next request tries again", exc_info=exc)
        return NotReady(f"waking the model failed ({type(exc).__name__}; see the server log); retry shortly", retry)

    # -- the idle timer -------------------------------------------------------------------------------------------

    def _idle(self) -> bool:
        return not (self._admitted or self._waiting or self._held) and self._resident == "awake"

    def _arm_idle_timer(self) -> None:
        """(Re)start the countdown to an idle sleep, if nothing is waiting or running."""
        self._cancel_idle_timer()
        if self.idle_sleep_s > 0 and not self._stopped and self._loop is not None and self._idle():
            self._idle_timer = self._loop.call_later(self.idle_sleep_s, self._idle_timeout)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self._idle() and self._falling_asleep is None and self._idle_task is None:
            self._idle_task = asyncio.create_task(self.sleep("idle"), name="idle-sleep")
            self._idle_task.add_done_callback(self._idle_sleep_ended)

    def _idle_sleep_ended(self, task: asyncio.Task[Transition]) -> None:
        self._idle_task = None
        if not task.cancelled() and task.exception() is not None:
            self._arm_idle_timer()  # logged by _fall_asleep; try again after another idle period
