"""Inference backends, a registry: name -> class that runs uint8 NHWC pixels to float32 logits.

- ``onnx``: onnxruntime; TensorRT EP then CUDA EP when a GPU is really there, else CPU.
  intra-op threads = cores, inter-op 1, sequential executor: one inference at a time owns the CPU.
- ``torchscript``: imports torch only when chosen; CUDA when present.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from imgformat.registry import Registry

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    device: str
    providers: list[str]

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, C) uint8 -> (B, num_classes) float32 logits."""

    def warm_run(self, pixels: np.ndarray) -> np.ndarray:
        """``run`` that hands its working memory back afterwards (warm-up must not pin memory)."""


_BACKENDS: Registry[Callable[..., Backend]] = Registry("backend")
register_backend = _BACKENDS.register
list_backends = _BACKENDS.names


def create_backend(name: str, path: Path, *, threads: int, device: str = "auto") -> Backend:
    return _BACKENDS.get(name, ValueError)(path, threads=threads, device=device)


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """CUDA devices via the driver API: onnxruntime-gpu lists CUDA EPs even on machines without a GPU."""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
        if lib.cuInit(0) != 0:
            return 0
        n = ctypes.c_int(0)
        return n.value if lib.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0
    except OSError:
        return 0


def _tensorrt_available() -> bool:
    for lib in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=1)
def _shared_cpu_arena(ort) -> bool:
    """One CPU memory arena for every onnxruntime session of the process.

    Each session's own arena grows to its largest batch's activations and keeps them: 8 ResNet-18
    models cost 380 MiB each where the weights are 43 MiB. With one shared arena (growing by what
    is asked, not in powers of two) an extra model costs its weights, and the arena holds the
    working memory of one batch at a time, which is all the single inference thread ever runs.
    docs/performance.md has the figures.
    """
    try:
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0 (no cap), extend strategy 1 (kSameAsRequested), default chunk settings
        ort.create_and_register_allocator(mem, ort.OrtArenaCfg(0, 1, -1, -1))
        return True
    except Exception as e:  # an onnxruntime without the API: per-session arenas, as before
        logger.warning("onnxruntime: no shared CPU arena (%s); each session keeps its own", e)
        return False


@register_backend("onnx")
class OnnxBackend:
    """onnxruntime session over a uint8 NHWC model."""

    name = "onnx"

    def __init__(self, path: Path, *, threads: int, device: str = "auto") -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if _shared_cpu_arena(ort):
            so.add_session_config_entry("session.use_env_allocators", "1")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Threads spin-wait between runs by default: on a 2-core host that steals the CPU the
        # event loop and the decoders need while the model is idle.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.providers = self._providers(ort, device)
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=self.providers)
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @staticmethod
    def _providers(ort, device: str) -> list[str]:
        available = ort.get_available_providers()
        want_gpu = device in ("auto", "cuda") and cuda_device_count() > 0
        if device == "cuda" and not want_gpu:
            logger.warning("IMGSERVE_DEVICE=cuda but no CUDA device is visible; using the CPU")
        providers = []
        if want_gpu and "TensorrtExecutionProvider" in available and _tensorrt_available():
            providers.append("TensorrtExecutionProvider")
        if want_gpu and "CUDAExecutionProvider" in available:
            providers.append("CUDAExecutionProvider")
        return providers + ["CPUExecutionProvider"]

    def run(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: pixels})[0]

    def warm_run(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: pixels}, self._shrink)[0]

    def run_with(self, pixels: np.ndarray, extra: str) -> np.ndarray:
        """Logits and the graph's output ``extra`` in one run, packed row by row as
        ``[logits | extra flattened]`` so any batcher can split them per request. ``run`` asks for
        the logits alone, so a bundle that carries ``extra`` costs /classify nothing more."""
        logits, more = self.session.run([self.output_name, extra], {self.input_name: pixels})
        return np.concatenate([logits, more.reshape(len(more), -1)], axis=1)


@register_backend("torchscript")
class TorchScriptBackend:
    """TorchScript module over uint8 NHWC pixels; imports torch only when this backend is chosen."""

    name = "torchscript"

    def __init__(self, path: Path, *, threads: int, device: str = "auto") -> None:
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before torch's first parallel work
            pass
        use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        self._torch = torch
        self._dev = torch.device("cuda" if use_cuda else "cpu")
        self.module = torch.jit.load(str(path), map_location=self._dev).eval()
        self.device = self._dev.type
        self.providers = [f"torch-{self.device}"]

    def run(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self._dev, non_blocking=True)
            return self.module(x).float().cpu().numpy()

    warm_run = run
