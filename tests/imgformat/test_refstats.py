"""Reference statistics and drift scores (imgformat/refstats.py): the formulas on hand-checked values,
the section against the manifest schema, and old bundles without it still loading."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from imgformat import refstats
from imgformat.bundle import BundleError, load_manifest, validate_manifest


@pytest.fixture(scope="module")
def digits_manifest(digits_bundle) -> dict:
    """A manifest export wrote now (it has reference_stats over the held-out digits)."""
    m = load_manifest(digits_bundle)
    ref = m["reference_stats"]
    assert ref["samples"] >= 1 and sum(ref["predicted_class_counts"]) == ref["samples"]
    assert ref["source"].startswith("dataset digits") and ref["true_class_counts"] is not None
    return m


def test_psi_and_js_on_hand_computed_values() -> None:
    assert refstats.psi([50, 50], [50, 50]) == pytest.approx(0.0, abs=1e-12)
    # PSI = (0.8-0.5) ln(0.8/0.5) + (0.2-0.5) ln(0.2/0.5)
    assert refstats.psi([1, 1], [8, 2]) == pytest.approx(0.3 * math.log(1.6) - 0.3 * math.log(0.4), rel=1e-3)
    assert refstats.jensen_shannon([1, 1], [1, 1]) == pytest.approx(0.0, abs=1e-12)
    # disjoint supports: JS (base 2) -> 1, PSI large but finite thanks to the share floor
    assert refstats.jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0, abs=2e-3)
    assert 5 < refstats.psi([1, 0], [0, 1]) < 50
    # symmetric, and one class taking all traffic scores far above sampling noise
    rng = np.random.default_rng(0)
    ref = np.bincount(rng.integers(0, 10, 2000), minlength=10)
    same = np.bincount(rng.integers(0, 10, 500), minlength=10)
    shifted = np.bincount(np.zeros(500, dtype=int), minlength=10)
    assert refstats.jensen_shannon(ref, shifted) == pytest.approx(refstats.jensen_shannon(shifted, ref))
    assert refstats.psi(ref, same) < 0.1 < 2 < refstats.psi(ref, shifted)


def test_compute_builds_a_section_the_schema_accepts(digits_manifest) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    images = rng.integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 40)
    sec = refstats.compute(probs, images, labels, "test")
    assert sum(sec["predicted_class_counts"]) == sum(sec["confidence_counts"]) == sum(sec["true_class_counts"]) == 40
    assert sec["channel_mean"][0] == pytest.approx(images.mean(), abs=1e-3)
    m = validate_manifest({**digits_manifest, "reference_stats": sec})
    assert m["reference_stats"]["stats_version"] == 1
    s = refstats.scores(sec, sec["predicted_class_counts"], sec["confidence_counts"])
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in s.values()), s


def test_schema_rejects_bad_sections_and_accepts_none(digits_manifest) -> None:
    old = {k: v for k, v in digits_manifest.items() if k != "reference_stats"}
    validate_manifest(old)  # an old bundle still loads
    sec = refstats.compute(np.eye(10)[np.arange(20) % 10], np.zeros((20, 8, 8, 1), np.uint8), None, "t")
    for breaks in ({"stats_version": 2}, {"predicted_class_counts": [1, 2]}, {"confidence_counts": [1]},
                   {"channel_mean": [1.0, 2.0, 3.0]}, {"samples": 0}):
        bad = copy.deepcopy(old)
        bad["reference_stats"] = {**sec, **breaks}
        with pytest.raises(BundleError):
            validate_manifest(bad)
