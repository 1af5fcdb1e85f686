"""On a GPU host: the ONNX backend runs on CUDA and answers what the CPU answers (skipped elsewhere:
the ``gpu`` marker skips only where no CUDA device is visible, tests/conftest.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from svc_factory import digit_uploads, png_bytes

pytestmark = pytest.mark.gpu


def _load(bundle: Path, device: str):
    from service.config import load_settings
    from service.models import load_model

    settings = load_settings({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_DEVICE": device})
    with ThreadPoolExecutor(1) as pool:
        return load_model(settings.models[0], settings, pool)


def test_cuda_backend_matches_the_cpu(bundle: Path) -> None:
    gpu, cpu = _load(bundle, "cuda"), _load(bundle, "cpu")
    assert gpu.backend.device == "cuda" and "CUDAExecutionProvider" in gpu.backend.providers, gpu.backend.providers
    imgs, _ = digit_uploads(32)
    x = np.stack([cpu.preprocessor(png_bytes(im)) for im in imgs])
    # GPU kernels sum in another order: logits within 1e-3, same top-1
    got, want = gpu.backend.run(x), cpu.backend.run(x)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
    assert (got.argmax(1) == want.argmax(1)).all()
