"""Payloads for the service tests: held-out test digits saved as 24x24 PNGs, so serving really
decodes and resizes them. The model is the shared ``digits_bundle`` (tests/conftest.py).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

UPLOAD_SIZE = 24


def digit_uploads(n: int | None = None) -> tuple[list[Image.Image], np.ndarray]:
    """Held-out digits as 24x24 "L" PIL images, and their labels."""
    from training.datasets import get_dataset

    ds = get_dataset("digits", seed=0).test
    imgs = [Image.fromarray(a, "L").resize((UPLOAD_SIZE, UPLOAD_SIZE), Image.BILINEAR) for a in ds.images[:n]]
    return imgs, np.asarray(ds.labels[:n])


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
