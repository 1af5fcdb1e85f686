"""The drift window of one model version: its latest predictions, bounded by count and by age, and
their drift scores against the bundle's ``reference_stats`` (docs/monitoring.md).

Pure numpy, no Prometheus: the service (``service.monitoring``) and the offline report
(``monitoring.report``) both bin with ``binned`` and score with ``scores``, so they agree on the
same images. The formulas are ``imgformat.refstats.psi`` / ``jensen_shannon``, the only copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from imgformat import refstats

# signal -> (the reference section's counts, the window's histogram)
SIGNALS: dict[str, str] = {"class_mix": "predicted_class_counts", "confidence": "confidence_counts",
                           "brightness": "brightness_counts"}
METRICS: dict[str, Callable[[Any, Any], float]] = {"psi": refstats.psi, "js": refstats.jensen_shannon}


@dataclass(frozen=True)
class Binned:
    """Images' predictions and inputs as histogram bins, one entry per image."""

    pred: np.ndarray      # top-1 class index
    conf_bin: np.ndarray  # refstats.confidence_bin of the top-1 probability
    bright_bin: np.ndarray  # refstats.brightness_bin of the per-image mean
    conf: np.ndarray      # the top-1 probabilities themselves (Prometheus sums)
    bright: np.ndarray    # the per-image means


def binned(probs: np.ndarray, pixels: np.ndarray) -> Binned:
    """Softmax ``probs`` (N, K) of uint8 ``pixels`` (N, H, W, C) after the one preprocessing path."""
    conf = probs.max(axis=1)
    bright = refstats.brightness(pixels)
    return Binned(probs.argmax(axis=1), refstats.confidence_bin(conf), refstats.brightness_bin(bright), conf, bright)


class DriftWindow:
    """A ring buffer of the last ``max_samples`` binned predictions, each with the time it arrived;
    ``counts`` leaves out those older than ``max_age_s``."""

    def __init__(self, num_classes: int, max_samples: int, max_age_s: float) -> None:
        self.num_classes, self.max_samples, self.max_age_s = num_classes, max_samples, max_age_s
        self._pred = np.zeros(max_samples, dtype=np.int32)
        self._conf = np.zeros(max_samples, dtype=np.int16)
        self._bright = np.zeros(max_samples, dtype=np.int16)
        self._t = np.full(max_samples, np.nan)  # an empty slot is in no window (NaN compares false)
        self._head = 0

    def add(self, b: Binned, now: float) -> None:
        n = min(len(b.pred), self.max_samples)
        idx = (self._head + np.arange(n)) % self.max_samples
        self._pred[idx], self._conf[idx], self._bright[idx] = b.pred[-n:], b.conf_bin[-n:], b.bright_bin[-n:]
        self._t[idx] = now
        self._head = (self._head + n) % self.max_samples

    def counts(self, now: float) -> dict[str, np.ndarray]:
        """Per signal, the histogram of the predictions in the window (same bins as the reference)."""
        live = self._t >= now - self.max_age_s
        return {"class_mix": np.bincount(self._pred[live], minlength=self.num_classes),
                "confidence": np.bincount(self._conf[live], minlength=refstats.CONFIDENCE_BINS),
                "brightness": np.bincount(self._bright[live], minlength=refstats.PIXEL_MEAN_BINS)}


def scores(reference: dict[str, Any], counts: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """signal -> metric -> score of the window's ``counts`` against the ``reference_stats`` section."""
    return {signal: {name: fn(reference[key], counts[signal]) for name, fn in METRICS.items()}
            for signal, key in SIGNALS.items()}


def summary(reference: dict[str, Any] | None, counts: dict[str, np.ndarray], min_samples: int) -> dict[str, Any]:
    """What GET /models (and the offline report) show: the window's histograms and, once it holds
    ``min_samples``, the scores; else why there are none."""
    n = int(counts["class_mix"].sum())
    out: dict[str, Any] = {"samples": n, "observed": {k: v.tolist() for k, v in counts.items()}}
    if reference is None:
        return {**out, "scores": None, "reason": "the bundle has no reference_stats: nothing to compare with"}
    if n < min_samples:
        return {**out, "scores": None, "reason": f"{n} predictions in the window, scores from {min_samples}"}
    return {**out, "scores": scores(reference, counts)}
