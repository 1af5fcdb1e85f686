"""JPEG decoders side by side: Pillow's reduced-scale decode (``draft``, what imgformat.preprocess does)
against libjpeg-turbo through simplejpeg (DCT-domain scaling too), on the same photos in one run.

    .venv/bin/python -m loadtests.jpeg_decoders --seconds 3

For china.jpg (640x427) and a phone-sized copy (4032x3024, quality 95): images per second on one
thread for the decode alone and for the whole 224 px RGB preprocessing, and whether the pixels are
identical (max absolute difference of the decoded arrays and of the model inputs). simplejpeg is
not a project dependency (the service does not use it): ``pip install 'simplejpeg>=1.8,<2'`` first.
"""
from __future__ import annotations

import argparse
import io
import os
import time
from typing import Callable

import numpy as np
from PIL import Image

from imgformat.preprocess import Preprocessor
from imgformat.spec import IMAGENET_MEAN, IMAGENET_STD, make_preprocess

PRE = Preprocessor.from_manifest(make_preprocess(channels=3, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                                 resize_policy="shorter_side_center_crop"))
NEED = 2 * PRE.resize_size  # the smallest side draft decoding keeps (imgformat.preprocess._draft)


def photos() -> dict[str, bytes]:
    import sklearn
    path = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "china.jpg")
    china = open(path, "rb").read()
    buf = io.BytesIO()
    Image.open(io.BytesIO(china)).resize((4032, 3024), Image.BICUBIC).save(buf, "JPEG", quality=95)
    return {"china.jpg 640x427": china, f"phone 4032x3024 ({len(buf.getvalue()) / 1e6:.1f} MB)": buf.getvalue()}


def pillow_decode(data: bytes) -> np.ndarray:
    img = PRE.open(data)
    PRE._draft(img)
    return np.asarray(img.convert("RGB"))


def turbo_decode(data: bytes) -> np.ndarray:
    try:
        import simplejpeg
    except ImportError:
        raise SystemExit("simplejpeg is not installed: pip install 'simplejpeg>=1.8,<2'") from None
    w, h = Image.open(io.BytesIO(data)).size  # header only, as the service's size checks do
    big = min(w, h) >= 2 * NEED  # the same rule as draft: scale only when the image is that large
    kw = {"min_height": NEED, "min_width": NEED} if big else {}
    return simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)


def pillow_pipeline(data: bytes) -> np.ndarray:
    return PRE(data)


def turbo_pipeline(data: bytes) -> np.ndarray:
    return PRE.finish(Image.fromarray(turbo_decode(data)))


def rate(fn: Callable[[bytes], np.ndarray], data: bytes, seconds: float) -> float:
    fn(data)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(data)
        n += 1
    return n / (time.perf_counter() - t0)


def _diff(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shapes differ {a.shape} vs {b.shape}"
    d = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    return "identical" if d == 0 else f"max diff {d}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    print(f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print("| photo | stage | Pillow draft img/s | simplejpeg img/s | ratio | pixels |\n|---|---|---|---|---|---|")
    for name, data in photos().items():
        for stage, (pil, tj) in {"decode": (pillow_decode, turbo_decode),
                                 "decode + 224 px preprocess": (pillow_pipeline, turbo_pipeline)}.items():
            a, b = rate(pil, data, args.seconds), rate(tj, data, args.seconds)
            print(f"| {name} | {stage} | {a:.1f} | {b:.1f} | {b / a:.2f} | {_diff(pil(data), tj(data))} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
