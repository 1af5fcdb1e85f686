"""The client-error exception every request path raises (multipart /classify and OIP /v2 alike)."""
from __future__ import annotations


class Refused(Exception):
    """A client error: HTTP ``status`` with a one-line message, counted under ``kind``."""

    def __init__(self, message: str, status: int, kind: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.extra = status, kind, extra or {}
