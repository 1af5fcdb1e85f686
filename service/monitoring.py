"""Live statistics per served model and version, and drift scores against the bundle's reference.

The series (docs/monitoring.md, "Live series"): predicted classes, top-1 confidence, input
brightness, size and aspect, decode failures, and per signal the drift score of a sliding window.
Labels are bounded: ``model``/``version`` are the served ones, ``class`` one of the model's class
names (an index into its list, never a string a client sent), ``format`` one of ``FORMATS``.

The request path only appends references (``Monitor.observe``, ``Monitor.saw_size``); the numpy
work (softmax, bins, counters) runs once per ``FLUSH_IMAGES`` images or once a second
(``start``), and the scores at most every ``SCORE_EVERY`` predictions or ``SCORE_EVERY_S``
seconds. ``IMGSERVE_MONITORING=0`` attaches ``OFF`` instead, whose methods do nothing.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Callable, Iterable

import numpy as np

import bentoml
from imgformat import refstats
from service import drift

logger = logging.getLogger(__name__)

FLUSH_IMAGES = 256            # pending images before the request path flushes them itself
FLUSH_BYTES = 8 * 1024 * 1024  # ... or pending pixel bytes (big inputs): a bound on what is held
FLUSH_S = 1.0                 # the background flush: /metrics lags traffic by at most this
SCORE_EVERY = 500             # predictions between two drift scorings ...
SCORE_EVERY_S = 5.0           # ... or seconds (so an idle window still ages out)

# The reference's bins (imgformat/refstats.py), so a panel of the live histogram compares with it.
# Bucket ``le=b`` counts values in [previous b, b): the reference's half-open bins.
CONFIDENCE_BOUNDS = tuple((i + 1) / refstats.CONFIDENCE_BINS for i in range(refstats.CONFIDENCE_BINS))
BRIGHTNESS_BOUNDS = tuple(256.0 * (i + 1) / refstats.PIXEL_MEAN_BINS for i in range(refstats.PIXEL_MEAN_BINS))
PIXELS_BOUNDS = tuple(float(s * s) for s in (28, 64, 128, 224, 256, 384, 512, 768, 1024, 2048, 4096, 8192))
ASPECT_BOUNDS = (0.25, 0.5, 0.67, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0, 4.0)

_MV = ["model", "version"]
PREDICTIONS = bentoml.metrics.Counter(name="imgserve_predictions", labelnames=[*_MV, "class"],
                                      documentation="Predicted top-1 class")
CONFIDENCE = bentoml.metrics.Histogram(name="imgserve_confidence", labelnames=_MV, buckets=CONFIDENCE_BOUNDS,
                                       documentation="Top-1 probability (the reference's 20 bins)")
BRIGHTNESS = bentoml.metrics.Histogram(name="imgserve_input_brightness", labelnames=_MV, buckets=BRIGHTNESS_BOUNDS,
                                       documentation="Per-image mean pixel value after preprocessing "
                                                     "(the reference's 16 bins)")
PIXELS = bentoml.metrics.Histogram(name="imgserve_input_pixels", labelnames=_MV, buckets=PIXELS_BOUNDS,
                                   documentation="Decoded width x height of each image")
ASPECT = bentoml.metrics.Histogram(name="imgserve_input_aspect", labelnames=_MV, buckets=ASPECT_BOUNDS,
                                   documentation="Decoded width / height of each image")
# Each worker scores its own window; the highest live one is what an alert should see.
DRIFT = bentoml.metrics.Gauge(name="imgserve_drift_score", labelnames=[*_MV, "signal", "metric"],
                              multiprocess_mode="livemax",
                              documentation="Drift of the sliding window against the bundle's reference_stats")
WINDOW = bentoml.metrics.Gauge(name="imgserve_drift_window_samples", labelnames=_MV, multiprocess_mode="livesum",
                               documentation="Predictions in the current drift window")
DECODE_FAILURES = bentoml.metrics.Counter(name="imgserve_decode_failures", labelnames=["model", "format"],
                                          documentation="Uploads that could not be decoded into pixels, "
                                                        "by the format their first bytes claim")

# The first bytes of each format the service decodes (imgformat.preprocess.ALLOWED_FORMATS).
MAGIC: tuple[tuple[bytes, str], ...] = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"),
                                        (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))
FORMATS = frozenset({"webp", "ppm", "unknown", *(f for _, f in MAGIC)})


def sniff_format(data: bytes) -> str:
    """The format an upload's first bytes claim (a bounded label), ``unknown`` for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) > 1 and data[:1] == b"P" and data[1:2] in b"123456":
        return "ppm"
    return next((fmt for magic, fmt in MAGIC if data.startswith(magic)), "unknown")


def _add_counts(child: Any, counts: np.ndarray, total: float) -> None:
    """Add a whole histogram of observations to a Prometheus histogram child at once.

    ``observe`` per value would cost a few microseconds each on the request's event loop; the
    child's per-bucket values (``_buckets``, not cumulative until collected) and ``_sum`` take
    the same increments in one call per non-empty bucket (tests/service/test_monitoring.py checks
    /metrics against the counts)."""
    for i in np.flatnonzero(counts).tolist():
        child._buckets[i].inc(int(counts[i]))
    child._sum.inc(float(total))


def _bucket_counts(values: np.ndarray, bounds: tuple[float, ...]) -> np.ndarray:
    """Counts per Prometheus bucket (``value <= bound``; the last is +Inf)."""
    return np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds) + 1)


class Monitor:
    """One model version's live statistics and drift window."""

    enabled = True

    def __init__(self, name: str, version: str, class_names: list[str], reference: dict[str, Any] | None,
                 probabilities: Callable[[np.ndarray], np.ndarray], window: int, window_s: float,
                 min_samples: int) -> None:
        self.name, self.version, self.reference, self.min_samples = name, version, reference, min_samples
        self.probabilities = probabilities
        self.window = drift.DriftWindow(len(class_names), window, window_s)
        self._classes = [PREDICTIONS.labels(name, version, c) for c in class_names]
        self._conf, self._bright = CONFIDENCE.labels(name, version), BRIGHTNESS.labels(name, version)
        self._pixels, self._aspect = PIXELS.labels(name, version), ASPECT.labels(name, version)
        self._window_gauge = WINDOW.labels(name, version)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_images = self._pending_bytes = 0
        self._sizes: list[tuple[int, int]] = []
        self._unscored, self._scored_at, self._published = 0, -math.inf, False
        self.last: dict[str, Any] = {}

    # -- the request path: references only ------------------------------------------------------
    def observe(self, pixels: np.ndarray, logits: np.ndarray) -> None:
        """A request's preprocessed ``pixels`` (N, H, W, C) and their ``logits`` (N, K)."""
        self._pending.append((pixels, logits))
        self._pending_images += len(logits)
        self._pending_bytes += pixels.nbytes
        if self._pending_images >= FLUSH_IMAGES or self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def saw_size(self, width: int, height: int) -> None:
        self._sizes.append((width, height))

    def decode_failed(self, data: bytes) -> None:
        DECODE_FAILURES.labels(self.name, sniff_format(data)).inc()

    # -- off the request path ----------------------------------------------------------------------
    def flush(self, now: float | None = None, score: bool = False) -> None:
        """Pending observations into the series and the window; rescore when due (or ``score``).
        Runs inside a request (``observe``) or the background task: a failure here is logged and
        those observations dropped, never a failed request or a dead flush loop."""
        try:
            self._flush(time.monotonic() if now is None else now, score)
        except Exception:
            logger.exception("monitoring of model %s v%s: flush failed, its pending observations are dropped",
                             self.name, self.version)

    def _flush(self, now: float, score: bool) -> None:
        if self._sizes:
            self._flush_sizes()
        if self._pending:
            pending, self._pending = self._pending, []
            self._pending_images = self._pending_bytes = 0
            b = drift.binned(self.probabilities(np.concatenate([lg for _, lg in pending])),
                             np.concatenate([px for px, _ in pending]))
            for i in np.flatnonzero(counts := np.bincount(b.pred, minlength=len(self._classes))).tolist():
                self._classes[i].inc(int(counts[i]))
            _add_counts(self._conf, np.bincount(b.conf_bin, minlength=len(CONFIDENCE_BOUNDS) + 1), b.conf.sum())
            _add_counts(self._bright, np.bincount(b.bright_bin, minlength=len(BRIGHTNESS_BOUNDS) + 1),
                        b.bright.sum())
            self.window.add(b, now)
            self._unscored += len(b.pred)
        if score or self._unscored >= SCORE_EVERY or now - self._scored_at >= SCORE_EVERY_S:
            self._score(now)

    def _flush_sizes(self) -> None:
        sizes, self._sizes = np.asarray(self._sizes, dtype=np.float64), []
        px, aspect = sizes[:, 0] * sizes[:, 1], sizes[:, 0] / sizes[:, 1]
        _add_counts(self._pixels, _bucket_counts(px, PIXELS_BOUNDS), px.sum())
        _add_counts(self._aspect, _bucket_counts(aspect, ASPECT_BOUNDS), aspect.sum())

    def _score(self, now: float) -> None:
        self._unscored, self._scored_at = 0, now
        self.last = drift.summary(self.reference, self.window.counts(now), self.min_samples)
        self._window_gauge.set(self.last["samples"])
        scores = self.last["scores"]
        if scores is None and not self._published:
            return  # no series until there is a first score
        self._published = True
        for signal in drift.SIGNALS:
            for metric in drift.METRICS:
                DRIFT.labels(self.name, self.version, signal, metric).set(
                    math.nan if scores is None else scores[signal][metric])

    def retire(self) -> None:
        """No longer served (repository unload or replace): its gauges stop claiming a score, so a
        drift alert on a version that left resolves."""
        self.flush()
        self._window_gauge.set(0)
        if self._published:
            for signal in drift.SIGNALS:
                for metric in drift.METRICS:
                    DRIFT.labels(self.name, self.version, signal, metric).set(math.nan)

    def describe(self) -> dict[str, Any]:
        """GET /models' ``drift``: scored now, from everything observed so far."""
        self.flush(score=True)
        w = self.window
        return {"enabled": True, "window": {"max_samples": w.max_samples, "max_age_s": w.max_age_s,
                                            "min_samples": self.min_samples}, **self.last}


class Off:
    """IMGSERVE_MONITORING=0: the same calls, doing nothing."""

    enabled = False

    def observe(self, pixels: np.ndarray, logits: np.ndarray) -> None:
        pass

    def saw_size(self, width: int, height: int) -> None:
        pass

    def decode_failed(self, data: bytes) -> None:
        pass

    def flush(self, now: float | None = None, score: bool = False) -> None:
        pass

    def retire(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"enabled": False, "reason": "IMGSERVE_MONITORING=0"}


OFF = Off()


def attach(model: Any, settings: Any, probabilities: Callable[[np.ndarray], np.ndarray]) -> None:
    """Give a loaded ServedModel its monitor (``model.monitor``)."""
    if not settings.monitoring:
        model.monitor = OFF
        return
    model.monitor = Monitor(model.name, model.version, model.class_names,
                            model.bundle.manifest.get("reference_stats"), probabilities,
                            settings.drift_window, settings.drift_window_s, settings.drift_min_samples)


def start(models: Callable[[], Iterable[Any]]) -> asyncio.Task:
    """Flush every served model's monitor once per ``FLUSH_S`` on this event loop (kept by the service)."""
    async def loop() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            for m in list(models()):
                m.monitor.flush()

    return asyncio.get_running_loop().create_task(loop())
