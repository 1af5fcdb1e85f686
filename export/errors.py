"""The export stage's two failures, shared by every export step.

Kept apart from bundle.py so the steps it drives (fp16, quantize) can raise them without importing it.
"""
from __future__ import annotations

from typing import Any


class ExportError(ValueError):
    """Bad input (checkpoint, output directory, options): one line, CLI exit status 2."""


class GateError(RuntimeError):
    """A gate failed (parity or INT8 accuracy): no bundle written, CLI exit status 1."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report
