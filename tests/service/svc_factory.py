"""Payloads and bundle for the service tests.

The model is the shared ``trained_digits_run`` (tests/conftest.py: simple_cnn trained for real on
scikit-learn's digits through ``training.train``), exported by ``export.export_bundle`` with its
parity gate. Uploads are held-out test digits saved as 24x24 PNGs, so serving really decodes and
resizes them.
"""
from __future__ import annotations

import io
from pathlib import Path

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


def make_bundle(checkpoint: Path, out: Path, name: str = "digits", int8: bool = False) -> Path:
    from export import export_bundle

    return export_bundle(checkpoint, out, name=name, version="1", samples=32, int8=int8,
                         calib_samples=64, int8_eval_samples=200)
