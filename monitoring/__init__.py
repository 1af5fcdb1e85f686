"""Offline monitoring tools: ``python -m monitoring.report`` (docs/monitoring.md)."""
