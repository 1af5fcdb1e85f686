"""Service configuration from IMGSERVE_* environment variables, read once at start-up.

What each variable means, its default and valid values: the settings table in docs/serving.md
(the only copy; ``tests/service/test_settings_doc.py`` checks that it lists exactly what
``load_settings`` reads).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from service.cpus import cpu_count

DEFAULT_MODELS = "bundles/default"


class ConfigError(ValueError):
    """A bad IMGSERVE_* variable; the message names the variable and the valid values."""


@dataclass(frozen=True)
class ModelSource:
    name: str | None  # None: take the manifest's name
    location: str  # a directory, or a BentoML model-store tag
    store: bool = False
    version: str | None = None  # NAME@VERSION=...: the version label it serves under; None: the manifest's


@dataclass(frozen=True)
class Settings:
    models: tuple[ModelSource, ...]
    backend: str = "onnx"
    precision: str = "fp32"
    device: str = "auto"
    workers: int = 1
    threads: int = field(default_factory=cpu_count)
    threads_explicit: bool = False  # IMGSERVE_THREADS was given: keep it for small models too
    batcher: str = "eager"
    small_model_ms: int = 5
    max_batch_size: int = 32
    max_latency_ms: int = 1000
    max_queue: int = 512
    max_body_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_images: int = 64
    timeout_s: int = 60
    api_key: str | None = None
    model_control: str = "none"  # "explicit": the repository API may load and unload models (needs api_key)
    model_root: str | None = None  # the repository API loads bundle directories from under this one only
    max_model_bytes: int = 2_000_000_000  # a bundle's model file over this is refused before it is read
    allow_unchecked: bool = False  # serve bundles whose gates failed or never ran
    tracing: bool = False  # OpenTelemetry spans for requests (health probes and /metrics never)
    grpc_port: int = 0  # IMGSERVE_GRPC_PORT: OIP v2 over gRPC on this port; 0 (unset): no gRPC server
    grpc_host: str = "127.0.0.1"  # IMGSERVE_GRPC_HOST: 0.0.0.0 in the container, as its HTTP port
    traffic: str | None = None  # IMGSERVE_TRAFFIC: the traffic policy file (docs/rollouts.md); None: none
    monitoring: bool = True  # live statistics and drift scores (docs/monitoring.md)
    drift_window: int = 2000  # the drift window's most predictions
    drift_window_s: int = 600  # ... and their greatest age
    drift_min_samples: int = 200  # no score from a window with fewer
    stall_dump_s: int = 10  # an event loop stalled this long gets its threads' stacks logged; 0: off

    def __repr__(self) -> str:  # never print the key
        return (f"Settings(models={self.models}, backend={self.backend}, precision={self.precision}, "
                f"workers={self.workers}, api_key={'set' if self.api_key else 'unset'})")


def parse_models(spec: str) -> tuple[ModelSource, ...]:
    """``"bundles/default,r18=bundles/r18,digits@v2=bundles/b,store:imgserve-default:latest"`` -> sources."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, loc = item.rpartition("=") if "=" in item else (None, "", item)
        name, at, version = (name or "").partition("@")
        if at and not (name and version):
            raise ConfigError(f"IMGSERVE_MODELS item {item!r}: write NAME@VERSION=LOCATION, both given")
        store = loc.startswith("store:")
        out.append(ModelSource(name or None, loc[len("store:"):] if store else loc, store, version or None))
    if not out:
        raise ConfigError("IMGSERVE_MODELS is empty; give a bundle directory, e.g. IMGSERVE_MODELS=bundles/default")
    return tuple(out)


def _int(env: Mapping[str, str], key: str, default: int, lo: int = 1) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not an integer") from None
    if v < lo:
        raise ConfigError(f"{key}={v} must be >= {lo}")
    return v


_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _bool(env: Mapping[str, str], key: str, default: bool = False) -> bool:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    if raw.lower() not in _BOOLS:
        raise ConfigError(f"{key}={raw!r} is not valid; choose one of: 1, 0 (or true/false, yes/no)")
    return _BOOLS[raw.lower()]


def _choice(env: Mapping[str, str], key: str, default: str, valid: tuple[str, ...]) -> str:
    v = env.get(key) or default
    if v not in valid:
        raise ConfigError(f"{key}={v!r} is not valid; choose one of: {', '.join(valid)}")
    return v


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read every IMGSERVE_* variable (``os.environ`` by default)."""
    from service.backends import list_backends
    from service.batching import list_batchers

    env = os.environ if env is None else env
    workers = cpu_count() if env.get("IMGSERVE_WORKERS") == "cores" else _int(env, "IMGSERVE_WORKERS", 1)
    return Settings(
        models=parse_models(env.get("IMGSERVE_MODELS") or DEFAULT_MODELS),
        backend=_choice(env, "IMGSERVE_BACKEND", "onnx", tuple(list_backends())),
        precision=_choice(env, "IMGSERVE_PRECISION", "fp32", ("fp32", "int8", "fp16")),
        device=_choice(env, "IMGSERVE_DEVICE", "auto", ("auto", "cpu", "cuda")),
        workers=workers,
        threads=_int(env, "IMGSERVE_THREADS", max(1, cpu_count() // workers)),
        threads_explicit=bool(env.get("IMGSERVE_THREADS")),
        batcher=_choice(env, "IMGSERVE_BATCHER", "eager", tuple(list_batchers())),
        small_model_ms=_int(env, "IMGSERVE_SMALL_MODEL_MS", 5, lo=0),
        max_batch_size=_int(env, "IMGSERVE_MAX_BATCH_SIZE", 32, lo=2),
        max_latency_ms=_int(env, "IMGSERVE_MAX_LATENCY_MS", 1000),
        max_queue=_int(env, "IMGSERVE_MAX_QUEUE", 512),
        max_body_bytes=_int(env, "IMGSERVE_MAX_BODY_BYTES", 20_000_000),
        max_pixels=_int(env, "IMGSERVE_MAX_PIXELS", 40_000_000),
        max_images=_int(env, "IMGSERVE_MAX_IMAGES", 64),
        timeout_s=_int(env, "IMGSERVE_TIMEOUT_S", 60),
        api_key=(api_key := _api_key(env)),
        model_control=_model_control(env, workers, api_key),
        model_root=_model_root(env),
        max_model_bytes=_int(env, "IMGSERVE_MAX_MODEL_BYTES", 2_000_000_000),
        allow_unchecked=_bool(env, "IMGSERVE_ALLOW_UNCHECKED"),
        tracing=_bool(env, "IMGSERVE_TRACING"),
        grpc_port=_int(env, "IMGSERVE_GRPC_PORT", 0, lo=0),
        grpc_host=env.get("IMGSERVE_GRPC_HOST") or "127.0.0.1",
        traffic=env.get("IMGSERVE_TRAFFIC") or None,
        monitoring=_bool(env, "IMGSERVE_MONITORING", True),
        drift_window=_int(env, "IMGSERVE_DRIFT_WINDOW", 2000),
        drift_window_s=_int(env, "IMGSERVE_DRIFT_WINDOW_S", 600),
        drift_min_samples=_int(env, "IMGSERVE_DRIFT_MIN_SAMPLES", 200),
        stall_dump_s=_int(env, "IMGSERVE_STALL_DUMP_S", 10, lo=0),
    )


def _api_key(env: Mapping[str, str]) -> str | None:
    """IMGSERVE_API_KEY, or the content of IMGSERVE_API_KEY_FILE (a secret mounted into a container)."""
    key, path = env.get("IMGSERVE_API_KEY") or None, env.get("IMGSERVE_API_KEY_FILE") or None
    if path is None:
        return key
    if key is not None:
        raise ConfigError("set IMGSERVE_API_KEY or IMGSERVE_API_KEY_FILE, not both")
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"IMGSERVE_API_KEY_FILE={path!r} cannot be read: {e.strerror}") from None
    if not key:
        raise ConfigError(f"IMGSERVE_API_KEY_FILE={path!r} is empty")
    return key


def _model_control(env: Mapping[str, str], workers: int, api_key: str | None) -> str:
    v = _choice(env, "IMGSERVE_MODEL_CONTROL", "none", ("none", "explicit"))
    if v == "explicit" and api_key is None:  # anyone could unload the serving model, or load their own
        raise ConfigError("IMGSERVE_MODEL_CONTROL=explicit needs an API key: set IMGSERVE_API_KEY (or "
                          "IMGSERVE_API_KEY_FILE), or leave model control off; refusing to start")
    if v == "explicit" and workers > 1:  # a load or unload request reaches one worker only
        raise ConfigError(f"IMGSERVE_MODEL_CONTROL=explicit needs IMGSERVE_WORKERS=1 (got {workers}): each worker "
                          "holds its own models, and a repository request would change only the one that takes it")
    return v


def _model_root(env: Mapping[str, str]) -> str | None:
    """IMGSERVE_MODEL_ROOT, resolved (``..`` and symlinks) once: the directory API loads must stay under."""
    raw = env.get("IMGSERVE_MODEL_ROOT") or None
    if raw is None:
        return None
    root = Path(raw).resolve()
    if not root.is_dir():
        raise ConfigError(f"IMGSERVE_MODEL_ROOT={raw!r} is not a directory")
    return str(root)
