"""Image flavours, a registry: name -> what its bentofile changes from the repository's bentofile.yaml.

bentofile.yaml is the CPU flavour (what `bentoml build && bentoml containerize` gives). The GPU
flavour's bentofile is generated from it, so the two never drift apart in what they serve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Flavour:
    name: str
    summary: str
    packages: dict[str, str] = field(default_factory=dict)  # package name -> its replacement pin
    docker: dict[str, Any] = field(default_factory=dict)  # merged into the bentofile's `docker:`
    local_base: bool = False  # can be built on a local Debian base (no registry needed)


_FLAVOURS: dict[str, Flavour] = {}


def register_flavour(f: Flavour) -> Flavour:
    if f.name in _FLAVOURS:
        raise KeyError(f"flavour {f.name!r} is already registered")
    _FLAVOURS[f.name] = f
    return f


def list_flavours() -> list[str]:
    return list(_FLAVOURS)


def get_flavour(name: str) -> Flavour:
    try:
        return _FLAVOURS[name]
    except KeyError:
        raise SystemExit(f"unknown flavour {name!r}; valid: {', '.join(list_flavours())}") from None


register_flavour(Flavour("cpu", "plain onnxruntime on python:3.11-slim (or the local Debian base)", local_base=True))
# onnxruntime-gpu 1.26.0 is the last PyPI build for CUDA 12 (1.27+ need CUDA 13 and a >= 580 driver);
# BentoML's CUDA 12.8 base is nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 (cuDNN 9).
register_flavour(Flavour("gpu", "onnxruntime-gpu (CUDA EP, TensorRT EP when its libraries are added) on CUDA 12.8 + cuDNN 9",
                         packages={"onnxruntime": "onnxruntime-gpu==1.26.0"}, docker={"cuda_version": "12.8"}))


def _package_name(pin: str) -> str:
    for sep in ("==", ">=", "<=", "~=", "!=", "<", ">", "[", ";", " "):
        pin = pin.split(sep, 1)[0]
    return pin.strip().lower()


def flavour_bentofile(flavour: Flavour, source: Path, out_dir: Path) -> Path:
    """The bentofile for `flavour`: `source` itself, or a generated copy with the flavour's changes."""
    if not flavour.packages and not flavour.docker:
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
    cfg.setdefault("labels", {})["flavour"] = flavour.name
    out = out_dir / f"bentofile.{flavour.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Generated from {source.name} by container/flavours.py (flavour {flavour.name}); do not edit.\n"
                   + yaml.safe_dump(cfg, sort_keys=False))
    return out
