"""The drift window's bounds (service/drift.py) and the decode-failure format label (service/monitoring.py)."""
from __future__ import annotations

import numpy as np

from service import drift, monitoring


def batch(classes: list[int], brightness: int = 100) -> drift.Binned:
    probs = np.eye(3)[classes] * 0.9 + 0.1 / 3
    pixels = np.full((len(classes), 4, 4, 1), brightness, dtype=np.uint8)
    return drift.binned(probs, pixels)


def test_window_keeps_the_latest_max_samples() -> None:
    w = drift.DriftWindow(3, max_samples=5, max_age_s=100)
    w.add(batch([0, 0, 0, 0]), now=0)
    w.add(batch([1, 1, 2]), now=1)
    assert w.counts(2)["class_mix"].tolist() == [2, 2, 1]  # the two oldest zeros left
    w.add(batch([2] * 9), now=2)  # more than fit at once: the last five
    assert w.counts(2)["class_mix"].tolist() == [0, 0, 5]


def test_window_forgets_predictions_older_than_max_age() -> None:
    w = drift.DriftWindow(3, max_samples=100, max_age_s=10)
    w.add(batch([0, 0]), now=0)
    w.add(batch([1]), now=8)
    assert w.counts(9)["class_mix"].tolist() == [2, 1, 0]
    assert w.counts(15)["class_mix"].tolist() == [0, 1, 0]
    assert w.counts(30)["class_mix"].sum() == 0  # no traffic: the window empties by itself


def test_summary_scores_only_from_min_samples_and_with_a_reference() -> None:
    w = drift.DriftWindow(3, max_samples=100, max_age_s=10)
    w.add(batch([0, 1, 2] * 10), now=0)
    ref = {"predicted_class_counts": [10, 10, 10], "confidence_counts": w.counts(0)["confidence"].tolist(),
           "brightness_counts": w.counts(0)["brightness"].tolist()}
    assert drift.summary(ref, w.counts(0), 31)["scores"] is None
    s = drift.summary(ref, w.counts(0), 30)["scores"]
    assert all(abs(v) < 1e-9 for sig in s.values() for v in sig.values()), s
    assert drift.summary(None, w.counts(0), 1)["scores"] is None


def test_decode_failure_format_is_one_of_a_fixed_set() -> None:
    cases = {b"\x89PNG\r\n\x1a\nrest": "png", b"\xff\xd8\xff\xe0": "jpeg", b"GIF89a": "gif", b"BM..": "bmp",
             b"II*\x00": "tiff", b"RIFF\x00\x00\x00\x00WEBPVP8": "webp", b"P6 1 1": "ppm", b"P": "unknown",
             b"<html>": "unknown", b"": "unknown", b"PK\x03\x04": "unknown"}
    for data, fmt in cases.items():
        assert monitoring.sniff_format(data) == fmt, data
        assert monitoring.sniff_format(data) in monitoring.FORMATS


def test_a_failing_flush_never_fails_the_request(caplog) -> None:
    ref = {"predicted_class_counts": [1, 1, 1], "confidence_counts": [1] * 20, "brightness_counts": [1] * 16}
    m = monitoring.Monitor("unit", "1", ["a", "b", "c"], ref, lambda z: z, 100, 60, 1)
    m.observe(np.zeros((1, 4, 4, 1), np.uint8), np.eye(3)[[0]])
    m.observe(np.zeros((1, 5, 5, 1), np.uint8), np.eye(3)[[1]])  # pixels that do not stack with the first
    m.flush()  # logged, dropped
    assert "flush failed" in caplog.text
    m.observe(np.zeros((2, 4, 4, 1), np.uint8), np.eye(3)[[2, 2]])
    assert m.describe()["observed"]["class_mix"] == [0, 0, 2]  # the next observations still count
