"""Export stage: checkpoint -> bundle (ONNX, TorchScript, manifest) behind a parity gate.

Kept import-light on purpose: ``export.manifest`` is imported by the service, which must not load
torch, so the heavy entry points are resolved lazily here.
"""
from __future__ import annotations

from typing import Any

__all__ = ["export_bundle", "ExportError", "GateError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from export import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
