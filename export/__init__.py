"""Export stage: checkpoint -> bundle (ONNX, TorchScript, manifest) behind a parity gate.

Importing ``export`` loads nothing heavy: the entry points are resolved lazily here. The bundle
format itself (reading, validating, hashing) lives in the torch-free ``imgformat`` package.
"""
from __future__ import annotations

from typing import Any

__all__ = ["export_bundle", "ExportError", "GateError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from export import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
