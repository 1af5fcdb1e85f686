"""Inference backends for the gate: callables ``uint8 (N, H, W, C) -> logits (N, K)``."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def torch_backend(module: torch.nn.Module):
    """An eager or TorchScript module on CPU."""
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run


def cuda_available() -> bool:
    """onnxruntime's CUDA provider is usable: the wheel has it *and* there is a device."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def ort_session(path: str | Path, provider: str = "CPUExecutionProvider", threads: int = 0):
    """An onnxruntime session pinned to ``provider`` (raises if it silently fell back to another)."""
    import onnxruntime as ort

    if provider == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # use the CUDA/cuDNN libraries that came with torch's wheels
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime fell back to {sess.get_providers()[0]} instead of {provider}")
    return sess


def ort_backend(path: str | Path, provider: str = "CPUExecutionProvider"):
    sess = ort_session(path, provider)
    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"image": x})[0]
    return run
