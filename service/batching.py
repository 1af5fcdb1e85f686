"""Batchers, a registry: gather decoded requests into one inference call per batch.

Every batcher takes already-validated uint8 arrays (a bad upload never reaches it), runs one
``backend.run`` at a time on the shared inference thread, and sheds load with ``Overloaded``
(-> 503 + Retry-After) when the estimated wait exceeds ``max_latency_ms``.

- ``eager`` (default): continuous batching. When the model is idle a request runs at once (no
  waiting for company); while a batch runs, arrivals queue and the next call takes all of them
  (up to ``max_batch_size``). Batches grow exactly as fast as load does. Admission control
  estimates the wait from the queue length and a moving average of the per-image cost.
- ``bentoml``: BentoML's own adaptive batcher (``CorkDispatcher``, what
  ``@bentoml.api(batchable=True)`` uses), fed the same validated arrays. It holds a lone request
  for its learnt wait and cancels queued requests (503) when its latency estimate exceeds
  ``max_latency_ms``; the README has the figures that made ``eager`` the default.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, Sequence

import numpy as np

from imgformat.registry import Registry
from service import metrics
from service.errors import Refused

logger = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], np.ndarray]


# When the current request reached the service (perf_counter), set by the HTTP guard. Time spent
# before admission (reading and parsing the body, waiting for the event loop) counts against the
# latency budget: the estimate alone let a 10 s budget answer after 36 s at twice the capacity.
ARRIVED: contextvars.ContextVar[float] = contextvars.ContextVar("imgserve_arrived")


def mark_arrival(at: float | None = None) -> None:
    """The current request arrived ``at`` (perf_counter; default now)."""
    ARRIVED.set(time.perf_counter() if at is None else at)


def waited_s() -> float:
    """Seconds since the current request arrived (0 outside a request)."""
    now = time.perf_counter()
    return now - ARRIVED.get(now)


class Overloaded(Exception):
    """Shed load: the caller answers 503 with ``Retry-After: retry_after``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_BATCHERS: Registry[type] = Registry("batcher")
register_batcher = _BATCHERS.register
list_batchers = _BATCHERS.names


def create_batcher(name: str, **kw) -> "EagerBatcher":
    return _BATCHERS.get(name, ValueError)(**kw)


@dataclass
class _Job:
    pixels: np.ndarray  # (n, H, W, C) uint8
    future: asyncio.Future
    enqueued: float
    deadline: float  # the request's arrival + the latency budget (perf_counter seconds)


def _retry_after(wait_s: float) -> int:
    return max(1, int(wait_s + 0.999))


class _Base:
    def __init__(self, *, model: str, run: RunFn, executor: Executor, max_batch_size: int,
                 max_latency_ms: int, max_queue: int) -> None:
        self.model = model
        self.run = run
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self.max_queue = max_queue
        self.per_image_s = 0.0  # EWMA of inference seconds per image, from warm-up and real batches
        # EWMA of wall seconds per finished image while busy: 1 / measured throughput of the whole
        # path (HTTP, decoding, the model, whatever else runs on the host).
        self.cost_s = 0.0
        self._busy_since = self._last_done = self._acc_s = 0.0
        self._acc_n = 0
        self.queued_images = 0  # waiting for the model
        self.in_flight = 0  # admitted and not answered yet (decoding, queued or running)

    def estimated_wait(self, extra: int = 1) -> float:
        # Little's law: wait = images in flight x time per image at the measured throughput.
        # Inference time alone misses decoding, which dominates for big images and a small model: the
        # overload tests in tests/reliability hold the latency budget only with the wall-clock rate.
        if self.in_flight == 0:
            # Idle: nothing to wait behind. The throughput figure is only updated by finished images,
            # so one measured in a collapse (a starved CPU, > the budget per image) would refuse every
            # request forever; the model's own time per image decides instead.
            return extra * self.per_image_s
        return (self.in_flight + extra) * max(self.cost_s, self.per_image_s)

    @contextlib.contextmanager
    def admitted(self, n: int = 1) -> Iterator[None]:
        """Admission control before any decoding: refuse ``n`` more images that cannot be served in time.

        Counting admitted (not only queued) images makes the refusal happen at the door, before the
        CPU is spent on decoding work that would be thrown away.
        """
        try:
            self.check(n)
        except Overloaded:
            metrics.ERRORS.labels(kind="overloaded").inc()
            raise
        if self.in_flight == 0:
            self._busy_since = time.perf_counter()
        self.in_flight += n
        try:
            yield
        finally:
            self.in_flight -= n
            self._finished(n)

    def check(self, n: int = 1, waited: float | None = None) -> None:
        """Raise Overloaded when ``n`` more images, ``waited`` seconds old (default: the current
        request's time since arrival), cannot be served in time; admits and counts nothing.

        A request larger than the whole queue can never be served, however long it waits: that is
        the client's error (413), not a retry-later (503)."""
        if n > self.max_queue:
            raise Refused(f"{n} images in one request can never be served: at most {self.max_queue} images may "
                          f"wait for model {self.model!r} (IMGSERVE_MAX_QUEUE, shared by the workers); send fewer "
                          f"per request", 413,
                          "over_max_queue")
        wait = self.estimated_wait(n) + (waited_s() if waited is None else waited)
        if self.in_flight + n > self.max_queue or wait > self.max_latency_s:
            raise Overloaded(f"overloaded: {self.in_flight} images (about {wait:.2f} s of work) are in flight for "
                             f"model {self.model!r}; retry later", _retry_after(max(wait - self.max_latency_s, 0.5)))

    def close(self) -> None:
        """Stop whatever runs in the background (a model being unloaded); nothing for most batchers."""

    def _finished(self, n: int) -> None:
        """Busy time per finished image, averaged over >= 16 images or 0.25 s (batches end together)."""
        now = time.perf_counter()
        self._acc_s += now - max(self._last_done, self._busy_since)
        self._acc_n += n
        self._last_done = now
        if self._acc_n >= 16 or self._acc_s >= 0.25:
            sample = self._acc_s / self._acc_n
            self.cost_s = sample if self.cost_s == 0 else 0.7 * self.cost_s + 0.3 * sample
            self._acc_s, self._acc_n = 0.0, 0

    def _observe(self, n: int, seconds: float) -> None:
        per = seconds / max(n, 1)
        self.per_image_s = per if self.per_image_s == 0 else 0.8 * self.per_image_s + 0.2 * per
        metrics.for_model(metrics.BATCH_SIZE, self.model).observe(n)
        metrics.for_model(metrics.INFERENCE, self.model).observe(seconds)

    def _timed_run(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = self.run(batch)
        return out, time.perf_counter() - t0


@register_batcher("eager")
class EagerBatcher(_Base):
    """Continuous batching on the event loop: no timers, no waiting when idle.

    Two ways to run a batch:
    - on the inference thread (default): the event loop keeps parsing and decoding meanwhile;
    - ``inline`` on the event loop, for models whose largest batch takes a few milliseconds (set
      by ``service.models``, IMGSERVE_SMALL_MODEL_MS). For such a model the hand-off to a thread
      (two context switches and a GIL hand-back that waits for the interpreter's switch interval
      while the loop is busy) costs more than the model, and the event loop is blocked no longer than
      one small batch. The run is deferred with ``call_soon`` so every
      request that reaches the batcher in the same loop iteration joins the batch.
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._queue: collections.deque[_Job] = collections.deque()
        self._busy = False
        self.inline = False

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        """(n, H, W, C) uint8 -> (n, num_classes) logits, batched with whatever else is waiting;
        a request larger than ``max_batch_size`` is queued in pieces of at most that size."""
        return await _in_pieces(self._infer, pixels, self.max_batch_size)

    async def _infer(self, pixels: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        job = _Job(pixels, loop.create_future(), now, ARRIVED.get(now) + self.max_latency_s)
        self._queue.append(job)
        self.queued_images += len(pixels)
        if not self._busy:
            self._dispatch(loop)
        return await job.future

    def _take(self) -> tuple[list[_Job], int]:
        """The queued jobs of the next batch (up to max_batch_size images), skipping cancelled ones."""
        jobs: list[_Job] = []
        n = 0
        now = time.perf_counter()
        while self._queue and (not jobs or n + len(self._queue[0].pixels) <= self.max_batch_size):
            job = self._queue.popleft()
            if job.future.cancelled():  # client went away while queued: skip its work
                self.queued_images -= len(job.pixels)
                continue
            if now + self.per_image_s * (n + len(job.pixels)) > job.deadline:
                self._too_late(job)  # its answer would come after the budget: useless to the client
                continue
            jobs.append(job)
            n += len(job.pixels)
        for job in jobs:
            metrics.for_model(metrics.QUEUE, self.model).observe(now - job.enqueued)
        return jobs, n

    def _too_late(self, job: _Job) -> None:
        """Refuse a queued job that can no longer be answered within its budget (503), so its batch
        slot goes to a request that still can; the admission estimate was too hopeful for it."""
        self.queued_images -= len(job.pixels)
        metrics.ERRORS.labels(kind="overloaded").inc()
        job.future.set_exception(Overloaded(
            f"overloaded: the request waited past its latency budget of {self.max_latency_s:.2f} s for model "
            f"{self.model!r} (IMGSERVE_MAX_LATENCY_MS); retry later", _retry_after(self.estimated_wait(0))))

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._busy = True
        if self.inline:
            loop.call_soon(self._run_inline, loop)
            return
        jobs, n = self._take()
        if not jobs:
            self._busy = False
            return
        cf = loop.run_in_executor(self.executor, self._timed_run, _concat(jobs))
        cf.add_done_callback(lambda f: self._done(loop, jobs, n, f))

    def _run_inline(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs, n = self._take()
        if not jobs:
            self._busy = False
            return
        f: concurrent.futures.Future = concurrent.futures.Future()
        try:
            f.set_result(self._timed_run(_concat(jobs)))
        except Exception as e:
            f.set_exception(e)
        self._done(loop, jobs, n, f)

    def _done(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], n: int, f) -> None:
        self._busy = False
        self.queued_images -= n
        try:
            out, seconds = f.result()
        except Exception as e:  # a model failure fails this batch only; log it once
            logger.exception("inference failed for a batch of %d on model %s", n, self.model)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
        else:
            self._observe(n, seconds)
            i = 0
            for job in jobs:
                k = len(job.pixels)
                if not job.future.done():
                    job.future.set_result(out[i:i + k])
                i += k
        if self._queue:
            self._dispatch(loop)


async def _in_pieces(infer: Callable[[np.ndarray], Awaitable[np.ndarray]], pixels: np.ndarray,
                     cap: int) -> np.ndarray:
    """``infer`` on slices of at most ``cap`` images, all queued at once, results in order."""
    if len(pixels) <= cap:
        return await infer(pixels)
    parts = await asyncio.gather(*(infer(pixels[i:i + cap]) for i in range(0, len(pixels), cap)))
    return np.concatenate(parts)


def _concat(jobs: list[_Job]) -> np.ndarray:
    return jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])


@register_batcher("bentoml")
class CorkBatcher(_Base):
    """BentoML's adaptive batcher (CorkDispatcher) with the same run function and admission."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        from bentoml._internal.marshal.dispatcher import CorkDispatcher

        def fallback():
            metrics.ERRORS.labels(kind="overloaded").inc()
            raise Overloaded("overloaded: BentoML's batcher dropped the request (max latency)", 1)

        self._dispatcher = CorkDispatcher(
            max_latency_in_ms=int(self.max_latency_s * 1000), max_batch_size=self.max_batch_size,
            fallback=fallback, get_batch_size=lambda x: x.shape[0], batch_dim=(0, 0))
        self._call = self._dispatcher(self._infer_batches)

    def close(self) -> None:
        # The dispatcher's controller task runs forever and would keep the model alive.
        self._dispatcher.shutdown()

    async def _infer_batches(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        sizes = [len(b) for b in batches]
        batch = batches[0] if len(batches) == 1 else np.concatenate(batches)
        out, seconds = await loop.run_in_executor(self.executor, self._timed_run, batch)
        self._observe(len(batch), seconds)
        return list(np.split(out, np.cumsum(sizes)[:-1]))

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        return await _in_pieces(self._infer, pixels, self.max_batch_size)

    async def _infer(self, pixels: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = await self._call(pixels)
        metrics.for_model(metrics.QUEUE, self.model).observe(max(time.perf_counter() - t0 - self.per_image_s * len(pixels), 0.0))
        return out
