"""Shadow runs: a candidate version on the very tensor the live version answered from (docs/rollouts.md).

The live answer never waits for the shadow: ``start`` schedules the shadow run as a task after the
live logits exist, and the task compares the two top-1 answers into the metrics. Shadow work is the
first thing shed: it is skipped (and counted) whenever live requests wait for the inference thread,
another shadow run is still under way, or the shadow's admission control would refuse. So a live
request waits for at most one shadow run of one request's images. A small model's run (its batches
run on the event loop: a whole batch within IMGSERVE_SMALL_MODEL_MS) costs less than the HTTP work
of a request. A bigger model's run that would take over ``CHEAP`` of the live request's own time so
far (a model whose inference is most of a request) is let through at most once per ``RARE_EVERY``
live requests: fewer than 1 % of live requests can then wait for one, and live p99 stays.
Its answer goes nowhere but the metrics.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field

import numpy as np

import bentoml
from service.batching import Overloaded, waited_s
from service.models import ServedModel, softmax

logger = logging.getLogger(__name__)
_LABELS = ["model", "live", "shadow"]
CHEAP = 0.10  # a shadow run estimated at most this share of the live request's time runs whenever it can
RARE_EVERY = 200  # a costlier one at most once per this many live requests that drew a shadow
_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

COMPARED = bentoml.metrics.Counter(name="imgserve_shadow_compared", labelnames=_LABELS,
                                   documentation="Images answered live and also run on the shadow version")
AGREED = bentoml.metrics.Counter(name="imgserve_shadow_agreed", labelnames=_LABELS,
                                 documentation="Compared images whose shadow top-1 class equals the live one")
TOP1_DELTA = bentoml.metrics.Summary(name="imgserve_shadow_top1_delta", labelnames=_LABELS,
                                     documentation="abs(live top-1 probability - the shadow's probability of that "
                                                   "class), per compared image (_sum / _count: the mean)")
LATENCY = bentoml.metrics.Histogram(name="imgserve_shadow_latency_seconds", labelnames=_LABELS, buckets=_LAT,
                                    documentation="Shadow inference time per request (its queue and run)")
SHED = bentoml.metrics.Counter(name="imgserve_shadow_shed", labelnames=_LABELS,
                               documentation="Shadow runs skipped because the service was busy")


@dataclass
class Stats:
    """The same figures as the metrics, for GET /models (one (name, live, shadow) triple)."""

    compared: int = 0
    agreed: int = 0
    top1_delta_sum: float = 0.0
    shed: int = 0

    def describe(self) -> dict:
        n = self.compared
        return {"compared": n, "agreed": self.agreed, "shed": self.shed,
                "agreement": self.agreed / n if n else None,
                "mean_abs_top1_delta": self.top1_delta_sum / n if n else None}


@dataclass
class Shadows:
    """The shadow runs in flight (kept referenced until done) and their statistics."""

    is_served: object  # ServedModel -> bool: the shadow version is still loaded when its turn comes
    stats: dict[tuple[str, str, str], Stats] = field(default_factory=dict)
    tasks: set = field(default_factory=set)  # the shadow runs under way (at most one)
    since_costly: int = RARE_EVERY  # live requests that drew a shadow since the last costly run

    def start(self, live: ServedModel, shadow: ServedModel | None, pixels: np.ndarray, logits: np.ndarray) -> None:
        """Run ``shadow`` on ``pixels`` in the background, or count it shed; never raises."""
        if shadow is None:
            return
        key = (live.name, live.version, shadow.version)
        self.since_costly += 1
        if self.tasks or _busy(live, shadow, len(pixels)) or not self._affordable(shadow, len(pixels)):
            self._shed(key)
            return
        # A fresh context: the shadow's latency budget starts now, not when the live request arrived.
        task = asyncio.get_running_loop().create_task(self._run(key, shadow, pixels, logits),
                                                      context=contextvars.Context())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _affordable(self, shadow: ServedModel, n: int) -> bool:
        """A small model, cheap next to the live request (``waited_s``: its time since it arrived),
        or the costly run's turn has come."""
        if getattr(shadow.batcher, "inline", False) or shadow.batcher.per_image_s * n <= CHEAP * waited_s():
            return True
        if self.since_costly >= RARE_EVERY:
            self.since_costly = 0
            return True
        return False

    def _shed(self, key: tuple[str, str, str]) -> None:
        SHED.labels(*key).inc()
        self.stats.setdefault(key, Stats()).shed += 1

    async def _run(self, key: tuple[str, str, str], shadow: ServedModel, pixels: np.ndarray,
                   live_logits: np.ndarray) -> None:
        if not self.is_served(shadow):  # unloaded or replaced meanwhile: its memory is on the way out
            return
        t0 = time.perf_counter()
        try:
            with shadow.batcher.admitted(len(pixels)):  # counted in flight: an unload drains it too
                logits = await shadow.batcher.infer(pixels)
        except Overloaded:
            self._shed(key)
            return
        except Exception:  # a shadow failure is the shadow's: the live answer is long gone
            logger.exception("shadow run of model %s v%s failed", shadow.name, shadow.version)
            return
        LATENCY.labels(*key).observe(time.perf_counter() - t0)
        self._compare(key, live_logits, logits)

    def _compare(self, key: tuple[str, str, str], live_logits: np.ndarray, shadow_logits: np.ndarray) -> None:
        p_live, p_shadow = softmax(live_logits), softmax(shadow_logits)
        top = p_live.argmax(axis=1)
        rows = np.arange(len(top))
        agreed = int((p_shadow.argmax(axis=1) == top).sum())
        delta = np.abs(p_live[rows, top] - p_shadow[rows, top])
        COMPARED.labels(*key).inc(len(top))
        AGREED.labels(*key).inc(agreed)
        summary = TOP1_DELTA.labels(*key)
        for d in delta.tolist():
            summary.observe(d)
        s = self.stats.setdefault(key, Stats())
        s.compared += len(top)
        s.agreed += agreed
        s.top1_delta_sum += float(delta.sum())

    def describe(self, name: str) -> list[dict]:
        return [{"live": live, "shadow": shadow, **s.describe()}
                for (n, live, shadow), s in sorted(self.stats.items()) if n == name]


def _busy(live: ServedModel, shadow: ServedModel, n: int) -> bool:
    """Shed the shadow run: live work waits for the inference thread, or the shadow's admission
    would refuse ``n`` more images."""
    if live.batcher.queued_images > 0:
        return True
    try:
        shadow.batcher.check(n)
    except Overloaded:
        return True
    return False
