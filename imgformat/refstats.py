"""Reference statistics of a bundle (manifest section ``reference_stats``) and the drift scores.

Export computes the section on held-out images that went through the one preprocessing path
(``imgformat.preprocess``); the service and the offline report compare live counts against it
with the same functions, so both give the same scores. The section is versioned on its own
(``stats_version``) so it can grow without touching the bundle's ``format_version``; a bundle
without it still serves and reports ``reference_stats: null``.

Drift scores (docs/monitoring.md):
- PSI, population stability index (Siddiqi, *Credit Risk Scorecards*, 2006):
  ``PSI = sum_i (q_i - p_i) * ln(q_i / p_i)``, p = reference, q = observed shares per bin.
- Jensen-Shannon divergence, base 2 (Lin, IEEE Trans. Inf. Theory 37(1), 1991):
  ``JS = H(m) - (H(p) + H(q)) / 2`` with ``m = (p + q) / 2``; 0 (same) .. 1 (disjoint).
Both use shares smoothed with ``EPS`` so an empty bin does not give infinity.
"""
from __future__ import annotations

from typing import Any

import numpy as np

STATS_VERSION = 1
CONFIDENCE_BINS = 20          # top-1 confidence histogram on [0, 1], equal width
PIXEL_MEAN_BINS = 16          # per-image mean brightness histogram on [0, 255]
EPS = 1e-4                    # share floor for empty bins (keeps PSI finite)


def confidence_bin(conf: np.ndarray) -> np.ndarray:
    """The bin of each top-1 confidence: ``CONFIDENCE_BINS`` equal bins of [0, 1], 1.0 in the last."""
    return np.clip((np.asarray(conf, dtype=np.float64) * CONFIDENCE_BINS).astype(np.int64), 0, CONFIDENCE_BINS - 1)


def confidence_hist(conf: np.ndarray) -> np.ndarray:
    """Counts of top-1 confidences in ``CONFIDENCE_BINS`` equal bins of [0, 1]."""
    return np.bincount(confidence_bin(conf), minlength=CONFIDENCE_BINS)


def class_counts(pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(pred, dtype=np.int64), minlength=num_classes)[:num_classes]


def brightness(images: np.ndarray) -> np.ndarray:
    """Per-image mean pixel value (all channels) of uint8 ``images`` (N, H, W, C)."""
    return images.reshape(len(images), -1).mean(axis=1)


def brightness_bin(means: np.ndarray) -> np.ndarray:
    """The bin of each per-image mean: ``PIXEL_MEAN_BINS`` equal bins of [0, 256)."""
    return np.clip((np.asarray(means) * PIXEL_MEAN_BINS / 256.0).astype(np.int64), 0, PIXEL_MEAN_BINS - 1)


def brightness_hist(images: np.ndarray) -> np.ndarray:
    """Counts of per-image mean pixel value (all channels) in ``PIXEL_MEAN_BINS`` bins of [0, 256)."""
    return np.bincount(brightness_bin(brightness(images)), minlength=PIXEL_MEAN_BINS)


def shares(counts: Any) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    p = c / total if total > 0 else np.full_like(c, 1.0 / len(c))
    p = np.maximum(p, EPS)
    return p / p.sum()


def psi(reference: Any, observed: Any) -> float:
    p, q = shares(reference), shares(observed)
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(reference: Any, observed: Any) -> float:
    p, q = shares(reference), shares(observed)
    m = (p + q) / 2

    def entropy(x: np.ndarray) -> float:
        return float(-np.sum(x * np.log2(x)))

    return max(0.0, entropy(m) - (entropy(p) + entropy(q)) / 2)


def compute(probs: np.ndarray, images: np.ndarray, labels: np.ndarray | None, source: str) -> dict[str, Any]:
    """The ``reference_stats`` section from softmax ``probs`` (N, K) of uint8 ``images`` (N, H, W, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    pixels = images.reshape(len(images), -1, images.shape[-1]).astype(np.float64)
    section: dict[str, Any] = {
        "stats_version": STATS_VERSION,
        "samples": int(len(probs)),
        "source": source,
        "predicted_class_counts": class_counts(pred, k).tolist(),
        "true_class_counts": class_counts(labels, k).tolist() if labels is not None else None,
        "confidence_bins": CONFIDENCE_BINS,
        "confidence_counts": confidence_hist(probs.max(axis=1)).tolist(),
        "brightness_bins": PIXEL_MEAN_BINS,
        "brightness_counts": brightness_hist(images).tolist(),
        "channel_mean": pixels.mean(axis=(0, 1)).round(4).tolist(),
        "channel_std": pixels.std(axis=(0, 1)).round(4).tolist(),
    }
    return section


def scores(ref: dict[str, Any], pred_counts: Any, conf_counts: Any) -> dict[str, float]:
    """Drift of observed class and confidence counts against the reference section."""
    return {
        "class_psi": psi(ref["predicted_class_counts"], pred_counts),
        "class_js": jensen_shannon(ref["predicted_class_counts"], pred_counts),
        "confidence_psi": psi(ref["confidence_counts"], conf_counts),
        "confidence_js": jensen_shannon(ref["confidence_counts"], conf_counts),
    }
