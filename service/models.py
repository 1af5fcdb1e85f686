"""Load the configured bundles into served models: manifest -> preprocessor, backend, batcher."""
from __future__ import annotations

import ctypes
import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgformat.bundle import Bundle, BundleError, load_bundle
from imgformat.constants import NAME_RE
from imgformat.preprocess import Preprocessor
from service import explain, monitoring
from service.backends import Backend, create_backend
from service.batching import create_batcher
from service.config import ModelSource, Settings

logger = logging.getLogger(__name__)

_KIND = {"onnx": "onnx", "torchscript": "torchscript"}
CHEAP_BATCH_S = 0.25  # warm up the largest batch itself when it is estimated to take at most this


@dataclass
class ServedModel:
    name: str
    bundle: Bundle
    preprocessor: Preprocessor
    backend: Backend
    batcher: Any
    file: Path
    class_names: list[str] = field(default_factory=list)
    backend_threads: int = 0  # intra-op threads of the backend (CPU)
    explainer: Any = None     # service.explain.Explainer when the model serves /explain
    no_explain: str = ""      # else why not (the 400 /explain answers)
    label: str = ""           # the version label it was configured under (NAME@VERSION=...), if any
    source: ModelSource | None = None  # where it was loaded from (the repository API reloads from there)
    monitor: Any = monitoring.OFF  # live statistics and drift (service.monitoring.attach)

    @property
    def version(self) -> str:
        """The configured label, else the manifest's version."""
        return self.label or str(self.bundle.manifest.get("version", ""))

    def describe(self, precision: str) -> dict[str, Any]:
        """What GET /models shows for this model."""
        m = self.bundle.manifest
        return {"name": self.name, "version": self.version, "architecture": m.get("architecture", {}).get("name"),
                "num_classes": len(self.class_names), "class_names": self.class_names, "input": m["input"],
                "preprocessing": m["preprocessing"], "backend": self.backend.name, "precision": precision,
                "file": self.file.name, "device": self.backend.device, "providers": list(self.backend.providers),
                "intra_op_threads": self.backend_threads,
                "max_batch_size": self.batcher.max_batch_size,
                "explain": ({"method": "cam", "layer": self.explainer.layer} if self.explainer is not None
                            else {"method": None, "reason": self.no_explain}),
                "batches_on": "event_loop" if getattr(self.batcher, "inline", False) else "inference_thread",
                "reference_stats": _reference_summary(m), "drift": self.monitor.describe()}

    def warm_up(self) -> float:
        """Run batch sizes 1 and 2 (dynamic batch axis, kernel choice), and the largest batch too when
        it is cheap; every run hands its memory back. Returns the seconds taken.

        The largest batch of a big model alone would take most of the time a load may cost; its
        per-image cost is then estimated from batch 2, whose per-image rate is close to the largest
        batch's on CPU.
        """
        t0 = time.perf_counter()
        big = self.batcher.max_batch_size
        per_image = self._warm((1, 2, 2))
        if per_image * big <= CHEAP_BATCH_S:
            # The fastest of a few full batches: on a busy host one run can take several times
            # longer, and this figure decides whether the model counts as small (load_models).
            per_image = min(self._warm((big, 1, big)), *(self._warm((big,)) for _ in range(3)))
        else:
            self._warm((big,))  # the batcher caps batches at `big`: the largest size ever run is warm
        if self.backend.device == "cuda":
            # GPU kernels (and TensorRT engines) are chosen per input shape: warm every power of two
            self._warm(warm_sizes(big))
        # Seed admission control with the measured cost, so overload is recognised from the first burst.
        self.batcher.per_image_s = per_image
        return time.perf_counter() - t0

    def _warm(self, sizes: tuple[int, ...]) -> float:
        """Run each batch size once; returns the last run's seconds per image."""
        for n in sizes:
            t1 = time.perf_counter()
            out = self.backend.warm_run(np.zeros((n, *self.preprocessor.shape), dtype=np.uint8))
            if out.shape != (n, len(self.class_names)):
                raise BundleError(f"model {self.name}: output shape {out.shape} for a batch of {n}, "
                                  f"expected {(n, len(self.class_names))}")
        return (time.perf_counter() - t1) / sizes[-1]


def warm_sizes(big: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``big``, then ``big``: the batch sizes a GPU warm-up runs."""
    sizes, n = [], 1
    while n < big:
        sizes.append(n)
        n *= 2
    return (*sizes, big)


def resolve_source(src: ModelSource) -> Path:
    """A bundle directory, or the directory of a BentoML model-store entry."""
    if not src.store:
        return Path(src.location)
    import bentoml

    try:
        return Path(bentoml.models.get(src.location).path)
    except bentoml.exceptions.NotFound:
        raise BundleError(f"model {src.location!r} is not in the BentoML model store "
                          f"(`python -m export CHECKPOINT --out DIR --bentoml` adds one; `bentoml models list` shows them)") from None


def load_model(src: ModelSource, settings: Settings, executor: Executor) -> ServedModel:
    bundle = load_bundle(resolve_source(src))
    name = src.name or bundle.name
    if not NAME_RE.match(name):
        raise BundleError(f"model name {name!r} must match {NAME_RE.pattern}")
    precision = settings.precision
    _check_gates(bundle, name, precision, settings.allow_unchecked)
    kind = _KIND[settings.backend]
    path = bundle.model_file(kind, precision, settings.max_model_bytes)  # size and sha256, before anything loads it
    backend = create_backend(settings.backend, path, threads=settings.threads, device=settings.device)
    pre = Preprocessor.from_manifest(bundle.manifest["preprocessing"], max_pixels=settings.max_pixels)
    batcher = create_batcher(settings.batcher, model=name, run=backend.run, executor=executor,
                             max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms,
                             max_queue=math.ceil(settings.max_queue / settings.workers))  # the bound is service-wide
    return ServedModel(name, bundle, pre, backend, batcher, path, list(bundle.manifest["class_names"]), settings.threads,
                       label=src.version or "", source=src)


def _check_gates(bundle: Bundle, name: str, precision: str, allow: bool) -> None:
    """Refuse a bundle whose manifest says a gate failed or never ran for the served precision."""
    why = bundle.unchecked(precision)
    if not why:
        return
    msg = f"model {name} ({bundle.path}, {precision}): {'; '.join(why)}"
    if not allow:
        raise BundleError(f"{msg}; refusing to serve it: re-export it where the gate can pass (an FP16 file on a "
                          f"GPU host), or set IMGSERVE_ALLOW_UNCHECKED=1 to serve it anyway")
    logger.warning("%s; served anyway because IMGSERVE_ALLOW_UNCHECKED=1", msg)


def load_models(settings: Settings, executor: Executor) -> list[ServedModel]:
    """Every configured model, hash-checked, loaded and warmed up, in the configured order (the
    first one's name is the default); one name may have several versions (NAME@VERSION=DIR)."""
    models: dict[tuple[str, str], ServedModel] = {}
    for src in settings.models:
        m = load_ready_model(src, settings, executor)
        if (m.name, m.version) in models:
            raise BundleError(f"two models are named {m.name!r} with version {m.version!r}; name one with NAME=DIR "
                              f"or give each version its label with NAME@VERSION=DIR in IMGSERVE_MODELS")
        models[m.name, m.version] = m
    return list(models.values())


def load_ready_model(src: ModelSource, settings: Settings, executor: Executor) -> ServedModel:
    """One model loaded, hash-checked and warmed up: what start-up and the repository API both serve."""
    m = load_model(src, settings, executor)
    secs = m.warm_up()
    batch_ms = m.batcher.per_image_s * m.batcher.max_batch_size * 1000
    if batch_ms <= settings.small_model_ms:
        secs += _tune_small_model(m, settings)
    explain.attach(m, settings, executor)  # after tuning: it runs the backend the model ends up with
    monitoring.attach(m, settings, softmax)
    logger.info("model %s v%s: %s on %s (%s), warm-up %.2f s, batch of %d in %.1f ms, %s",
                m.name, m.version, m.file.name, m.backend.device, ",".join(m.backend.providers), secs,
                m.batcher.max_batch_size, batch_ms,
                f"{m.backend_threads} intra-op thread(s), "
                + ("batches on the event loop" if getattr(m.batcher, "inline", False) else "batches on the inference thread"))
    malloc_trim()  # loading freed the model file's bytes and the warm-up's buffers
    return m


def malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS would not fall)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tune_small_model(m: ServedModel, settings: Settings) -> float:
    """A model whose largest batch takes a few ms: its batches run on the event loop
    (``EagerBatcher.inline``) with one intra-op thread: on a thread, each batch waits for the busy
    loop to hand back the GIL, and waking a second intra-op thread for each of the model's tiny
    operators costs more than it saves (docs/performance.md, small model). An explicit
    IMGSERVE_THREADS wins. Returns the extra warm-up seconds."""
    if hasattr(m.batcher, "inline"):
        m.batcher.inline = True
    if settings.threads == 1 or m.backend.device != "cpu" or settings.threads_explicit:
        return 0.0
    m.backend = create_backend(settings.backend, m.file, threads=1, device=settings.device)
    m.backend_threads = 1
    m.batcher.run = m.backend.run
    return m.warm_up()


def top_k(logits: np.ndarray, k: int, class_names: list[str]) -> list[dict[str, Any]]:
    """One row of logits -> the k best classes with softmax scores, highest first."""
    p = softmax(logits)
    idx = np.argsort(-p, kind="stable")[:k]
    return [{"label": class_names[i], "index": int(i), "score": float(p[i])} for i in idx]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Logits (..., C) -> float64 probabilities over the last axis (/classify's scores, OIP's probabilities)."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Whether drift can be scored for this model: old bundles have no reference statistics and
    still serve, and /models says so instead of pretending."""
    ref = manifest.get("reference_stats")
    if ref is None:
        return {"present": False, "reason": "bundle has no reference_stats (exported before they existed)"}
    return {"present": True, "stats_version": ref["stats_version"], "samples": ref["samples"], "source": ref["source"]}
