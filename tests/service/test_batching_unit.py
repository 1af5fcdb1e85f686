"""The batchers alone: a fake NumPy model under asyncio, no server (milliseconds each).

The fake ``run`` returns, for each image, its first pixel as a one-column logit, so every answer
can be traced back to its image; it records the batch sizes it was given and can be held (a
threading.Event) to let requests pile up while a batch runs.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batching import ARRIVED, Overloaded, create_batcher, list_batchers
from service.errors import Refused


class FakeModel:
    def __init__(self, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on  # the batch index that raises

    def run(self, pixels: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        self.sizes.append(len(pixels))
        if self.fail_on is not None and len(self.sizes) - 1 == self.fail_on:
            raise RuntimeError("model exploded")
        return pixels.reshape(len(pixels), -1)[:, :1].astype(np.float32)  # (n, 1): the image's id


def images(start: int, n: int) -> np.ndarray:
    """(n, 2, 2, 1) uint8 whose first pixel is the image's id."""
    x = np.zeros((n, 2, 2, 1), np.uint8)
    x[:, 0, 0, 0] = np.arange(start, start + n)
    return x


def make(name: str, model: FakeModel, pool: ThreadPoolExecutor, **kw):
    opts = dict(model="m", run=model.run, executor=pool, max_batch_size=8, max_latency_ms=10_000, max_queue=512)
    return create_batcher(name, **{**opts, **kw})


@pytest.fixture
def pool():
    with ThreadPoolExecutor(1) as p:
        yield p


async def _wait_until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize("name", list_batchers())
def test_max_batch_size_is_a_real_cap(pool, name: str) -> None:
    """A 64-image request runs as batches of at most max_batch_size, answers in order."""
    model = FakeModel()

    async def main():
        b = make(name, model, pool)
        out = await b.infer(images(0, 64))
        b.close()
        return out

    out = asyncio.run(main())
    assert max(model.sizes) <= 8 and sum(model.sizes) == 64, model.sizes
    assert out[:, 0].tolist() == list(range(64))


def test_requests_arriving_while_busy_form_one_batch(pool) -> None:
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = make("eager", model, pool)
        first = asyncio.ensure_future(b.infer(images(0, 1)))
        await _wait_until(lambda: b.queued_images == 1 and not b._queue)  # the first batch is running
        rest = [asyncio.ensure_future(b.infer(images(i, 1))) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        model.gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert model.sizes == [1, 5], model.sizes
    assert first[0, 0] == 0 and [r[0, 0] for r in rest] == [1, 2, 3, 4, 5]


def test_a_cancelled_waiting_request_is_skipped(pool) -> None:
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = make("eager", model, pool)
        first = asyncio.ensure_future(b.infer(images(0, 1)))
        await _wait_until(lambda: not b._queue and b.queued_images == 1)
        gone = asyncio.ensure_future(b.infer(images(1, 3)))
        kept = asyncio.ensure_future(b.infer(images(4, 1)))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while queued
        await asyncio.sleep(0.01)
        model.gate.set()
        await first
        out = await kept
        return out, b.queued_images

    out, queued = asyncio.run(main())
    assert model.sizes == [1, 1] and out[0, 0] == 4, model.sizes
    assert queued == 0, "the cancelled request's images were not released from the queue count"


def test_a_failing_run_fails_its_batch_only(pool) -> None:
    model = FakeModel(fail_on=0)

    async def main():
        b = make("eager", model, pool)
        with pytest.raises(RuntimeError, match="exploded"):
            await b.infer(images(0, 2))
        return await b.infer(images(7, 1))

    assert asyncio.run(main())[0, 0] == 7


def test_overload_is_refused_with_retry_after(pool) -> None:
    b = make("eager", FakeModel(), pool, max_queue=4, max_latency_ms=1000)
    with b.admitted(3):
        with pytest.raises(Overloaded) as err:
            b.check(2)  # 3 + 2 images > max_queue 4
        assert err.value.retry_after >= 1
    b.per_image_s = 0.5  # measured cost: 3 images would wait 1.5 s > 1 s
    with pytest.raises(Overloaded) as err:
        b.check(3)
    assert err.value.retry_after == 1 and "retry later" in str(err.value)
    b.check(2)  # 1.0 s fits


def test_time_before_admission_counts_against_the_budget(pool) -> None:
    """A request that spent its budget reading its body is refused at once, whatever the queue."""
    b = make("eager", FakeModel(), pool, max_latency_ms=200)

    async def main() -> None:
        ARRIVED.set(time.perf_counter() - 0.3)  # arrived 300 ms ago (slow upload, busy loop)
        with pytest.raises(Overloaded):
            b.check(1)
        ARRIVED.set(time.perf_counter())
        b.check(1)

    asyncio.run(main())


def test_a_queued_request_past_its_budget_is_refused_not_run(pool) -> None:
    """While a long batch runs, a queued request whose budget runs out gets 503; the model never
    spends a batch slot on an answer that would come too late. Work still in time is served."""
    model = FakeModel()
    b = make("eager", model, pool, max_latency_ms=100)

    async def main():
        model.gate.clear()
        first = asyncio.create_task(b.infer(images(1, 1)))  # runs, held by the gate
        await _wait_until(lambda: len(model.sizes) == 0 and b.queued_images == 0)
        late = asyncio.create_task(b.infer(images(2, 1)))  # queued behind the held batch
        await asyncio.sleep(0.2)  # past its 100 ms budget
        model.gate.set()
        assert (await first)[0, 0] == 1
        with pytest.raises(Overloaded, match="latency budget"):
            await late
        b.per_image_s = 0.001  # the held batch was measured as 0.2 s per image; a real run is quick
        assert (await b.infer(images(3, 1)))[0, 0] == 3  # a fresh request is in time

    asyncio.run(main())
    assert model.sizes == [1, 1], "the late request must not reach the model"


def test_a_request_larger_than_the_queue_is_413_not_503(pool) -> None:
    b = make("eager", FakeModel(), pool, max_queue=4)
    with pytest.raises(Refused) as err:
        b.check(5)
    assert err.value.status == 413 and "IMGSERVE_MAX_QUEUE" in str(err.value)


class FakeBackend:
    """Records warm-up batch sizes; ``per_image_s`` of sleep per image makes it cheap or expensive."""

    def __init__(self, device: str, per_image_s: float) -> None:
        self.device, self.per_image_s, self.sizes = device, per_image_s, []

    def warm_run(self, pixels: np.ndarray) -> np.ndarray:
        import time

        self.sizes.append(len(pixels))
        time.sleep(self.per_image_s * len(pixels))
        return np.zeros((len(pixels), 2), np.float32)


@pytest.mark.parametrize("device,per_image_s,want", [
    ("cpu", 0.012, {1, 2, 32}),                    # expensive on the CPU: 1, 2 and the capped largest batch
    ("cpu", 0.0, {1, 2, 32}),                      # cheap: timed on full batches
    ("cuda", 0.0, {1, 2, 4, 8, 16, 32}),           # GPU kernels are per shape: every power of two
])
def test_warm_up_covers_the_batch_sizes_the_cap_allows(pool, device: str, per_image_s: float, want: set) -> None:
    from types import SimpleNamespace

    from service.models import ServedModel

    backend = FakeBackend(device, per_image_s)
    m = ServedModel("m", None, SimpleNamespace(shape=(2, 2, 1)), backend, make("eager", FakeModel(), pool, max_batch_size=32),
                    None, ["a", "b"])
    m.warm_up()
    assert set(backend.sizes) == want and max(backend.sizes) == m.batcher.max_batch_size, backend.sizes


def test_an_idle_model_is_not_refused_by_a_stale_throughput(pool) -> None:
    """The wall-clock cost per image is measured only from finished images: one taken in a collapse
    (over the budget) must not refuse every later request while nothing is in flight, or the
    service never serves, and so never re-measures, again (seen: 100 % 503 at 0.5x after a 4x step)."""
    b = make("eager", FakeModel(), pool, max_latency_ms=100)
    b.per_image_s = 0.001
    b.cost_s = 0.5  # measured while the CPU was starved: 5x the budget per image
    b.check(1)  # idle: admitted on the model's own time per image
    with b.admitted(1):
        with pytest.raises(Overloaded):
            b.check(1)  # busy: the measured throughput counts again
