"""Decode + preprocess milliseconds per image: what the one-pipeline policy costs or saves.

    .venv/bin/python -m loadtests.decode_bench --seconds 3

For a 640x427 JPEG (china.jpg as shipped) and the same photo at 4000x3000, and for the two model
shapes of the parity test (224 px shorter side + centre crop RGB; 28 px grey stretch), in one run:
- ``training before``: what training's eval transform and file loading did before issue 14: full
  decode, no EXIF, PIL colour conversion, torchvision Resize (+ CenterCrop) on the whole image;
- ``pipeline, full decode``: ``imgformat.preprocess`` with draft decoding off;
- ``pipeline``: ``imgformat.preprocess`` as the service, training and export now all run it
  (reduced-scale JPEG decode, EXIF, crop-box resize). The service ran this before too.
Median of repeated single-image runs on one thread; prints a table.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Callable

import numpy as np
from PIL import Image

from imgformat.preprocess import Preprocessor
from imgformat.spec import IMAGENET_MEAN, IMAGENET_STD, make_preprocess

PRESETS = {
    "rgb224_crop": make_preprocess(channels=3, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                   resize_policy="shorter_side_center_crop"),
    "grey28_stretch": make_preprocess(channels=1, input_size=28, mean=[0.286], std=[0.353]),
}


def jpegs() -> dict[str, bytes]:
    from loadtests.payloads import sample_photo_path

    with open(sample_photo_path("china"), "rb") as f:
        small = f.read()
    buf = io.BytesIO()
    Image.open(io.BytesIO(small)).convert("RGB").resize((4000, 3000), Image.BILINEAR).save(buf, "JPEG", quality=85)
    return {"640x427": small, "4000x3000": buf.getvalue()}


def training_before(pre: dict) -> Callable[[bytes], np.ndarray]:
    """The pre-issue-14 training path: full decode, PIL convert, torchvision geometry."""
    from torchvision import transforms as T

    size = pre["input_size"]
    geometry = T.Resize((size, size)) if pre["resize_policy"] == "stretch" else \
        T.Compose([T.Resize(pre["resize_size"]), T.CenterCrop(size)])

    def run(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(geometry(im.convert(pre["color_mode"])))
    return run


def median_ms(fn: Callable[[bytes], np.ndarray], data: bytes, seconds: float) -> float:
    fn(data)  # warm
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (3)")
    a = ap.parse_args()
    files = jpegs()
    print(f"{'image':>10} {'model':>15} {'training before':>16} {'pipeline, full decode':>22} {'pipeline':>9}  (ms/image)")
    for fname, data in files.items():
        for preset, pre in PRESETS.items():
            row = [median_ms(training_before(pre), data, a.seconds),
                   median_ms(Preprocessor.from_manifest(pre, draft=False), data, a.seconds),
                   median_ms(Preprocessor.from_manifest(pre), data, a.seconds)]
            print(f"{fname:>10} {preset:>15} {row[0]:>16.2f} {row[1]:>22.2f} {row[2]:>9.2f}")


if __name__ == "__main__":
    main()
