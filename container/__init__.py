"""Serving images from the bento: ``make image`` / ``python -m container build`` (docs/container.md)."""
