"""Image flavours, a registry: name -> what its bentofile changes from the repository's bentofile.yaml.

bentofile.yaml is the CPU flavour (what `bentoml build && bentoml containerize` gives). The GPU
flavour's bentofile is generated from it, so the two never drift apart in what they serve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgformat.registry import Registry


@dataclass(frozen=True)
class Flavour:
    name: str
    summary: str
    packages: dict[str, str] = field(default_factory=dict)  # package name -> its replacement pin
    docker: dict[str, Any] = field(default_factory=dict)  # merged into the bentofile's `docker:`
    envs: dict[str, str] = field(default_factory=dict)  # added to the bentofile's `envs:` (the image's ENV)
    local_base: bool = False  # can be built on a local Debian base (no registry needed)


_FLAVOURS: Registry[Flavour] = Registry("flavour", keep_order=True)
list_flavours = _FLAVOURS.names


def register_flavour(f: Flavour) -> Flavour:
    return _FLAVOURS.add(f.name, f)


def get_flavour(name: str) -> Flavour:
    return _FLAVOURS.get(name, SystemExit)


register_flavour(Flavour("cpu", "plain onnxruntime on python:3.11-slim (or the local Debian base)", local_base=True))
# onnxruntime-gpu 1.26.0 is the last PyPI build for CUDA 12 (1.27+ need CUDA 13 and a >= 580 driver).
# Its `cuda` and `cudnn` extras bring the CUDA 12 runtime, cuBLAS, cuFFT, cuRAND, NVRTC and cuDNN 9 as
# PyPI wheels (nvidia-*-cu12), which is how onnxruntime documents the install: the image needs no
# nvidia/cuda base, so it builds on the CPU flavour's base (python:3.11-slim, or the local Debian base
# where no registry is reachable). The driver (libcuda.so.1) comes from the host at run time, through
# the NVIDIA container toolkit, which injects the compute libraries only when this variable asks.
# The wheels' libraries are not on the loader's path; onnxruntime's CUDA provider links them by soname
# (libcudart.so.12, libcublas.so.12, libcudnn.so.9, ...), so the image names their folders (the venv is
# /app/.venv with Python 3.11, container/Dockerfile.j2). tests/container checks every one resolves (ldd).
_CUDA_WHEEL_LIBS = ":".join(f"/app/.venv/lib/python3.11/site-packages/nvidia/{p}/lib" for p in
                            ("cuda_runtime", "cublas", "cudnn", "cufft", "curand", "cuda_nvrtc", "nvjitlink"))
register_flavour(Flavour("gpu", "onnxruntime-gpu with CUDA 12 + cuDNN 9 from PyPI wheels (CUDA EP), same base as cpu",
                         packages={"onnxruntime": "onnxruntime-gpu[cuda,cudnn]==1.26.0"},
                         envs={"NVIDIA_DRIVER_CAPABILITIES": "compute,utility", "LD_LIBRARY_PATH": _CUDA_WHEEL_LIBS},
                         local_base=True))


def _package_name(pin: str) -> str:
    for sep in ("==", ">=", "<=", "~=", "!=", "<", ">", "[", ";", " "):
        pin = pin.split(sep, 1)[0]
    return pin.strip().lower()


def flavour_bentofile(flavour: Flavour, source: Path, out_dir: Path) -> Path:
    """The bentofile for `flavour`: `source` itself, or a generated copy with the flavour's changes."""
    if not flavour.packages and not flavour.docker and not flavour.envs:
        return source
    cfg = yaml.safe_load(source.read_text())
    pkgs, replaced = cfg["python"]["packages"], set()
    for i, pin in enumerate(pkgs):
        if _package_name(pin) in flavour.packages:
            replaced.add(_package_name(pin))
            pkgs[i] = flavour.packages[_package_name(pin)]
    if set(flavour.packages) - replaced:
        raise SystemExit(f"{source} lists none of {sorted(set(flavour.packages) - replaced)}, "
                         f"which flavour {flavour.name!r} replaces")
    cfg["docker"] = {**cfg.get("docker", {}), **flavour.docker}
    cfg["envs"] = [*cfg.get("envs", []), *({"name": k, "value": v} for k, v in flavour.envs.items())]
    cfg.setdefault("labels", {})["flavour"] = flavour.name
    out = out_dir / f"bentofile.{flavour.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Generated from {source.name} by container/flavours.py (flavour {flavour.name}); do not edit.\n"
                   + yaml.safe_dump(cfg, sort_keys=False))
    return out
