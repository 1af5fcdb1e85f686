"""loadtests/gpu_check.py without a GPU: its parity comparison applies the gate as written, and the
check refuses to run, saying why, where no CUDA device is visible (the GPU run itself: docs/container.md)."""
from __future__ import annotations

import numpy as np
import pytest

from loadtests import gpu_check
from service.backends import cuda_device_count

GATE = {"atol": 1e-4, "rtol": 1e-3, "min_top1_agreement": 1.0}


def test_compare_applies_the_gate() -> None:
    ref = np.array([[1.0, 2.0, 0.5], [3.0, 0.0, 1.0]], np.float32)
    assert gpu_check.compare(ref, ref + 5e-5, GATE)["passed"]
    off = gpu_check.compare(ref, ref + np.array([[0, 0.01, 0], [0, 0, 0]]), GATE)
    assert not off["passed"] and off["top1_agreement"] == 1.0 and off["max_abs"] == pytest.approx(0.01)
    flipped = gpu_check.compare(ref, ref[:, ::-1].copy(), {**GATE, "atol": 10.0})
    assert not flipped["passed"] and flipped["top1_agreement"] == 0.5


def test_refuses_without_a_gpu(tmp_path) -> None:
    if cuda_device_count():
        pytest.skip("a GPU is here: run the check itself (scripts/gpu_check.sh)")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--bundle", str(tmp_path)])
