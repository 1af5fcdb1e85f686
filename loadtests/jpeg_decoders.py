"""JPEG decoders side by side in the one preprocessing pipeline (imgformat.preprocess): the
``Preprocessor`` as served against the same one with only ``img.load()`` swapped for libjpeg-turbo
through simplejpeg (same draft scale, same EXIF, colour and resize/crop code), one thread.

    .venv/bin/python -m loadtests.jpeg_decoders --rounds 5 --seconds 1

Prints images per CPU second of the thread (median of interleaved rounds) for three model inputs
(224 px RGB shorter side + crop, 224 px RGB stretch, 28 px grey) and the decode alone, on
china.jpg, a 4032x3024 phone-sized copy and an upscaled flower.jpg, with the max absolute
difference of the outputs; then checks a grey, a progressive, an EXIF-rotated, a 4:4:4 and a CMYK
JPEG for identical model inputs.
simplejpeg is not a project dependency (not adopted: docs/performance.md): install it first.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from imgformat.preprocess import Preprocessor
from imgformat.spec import make_preprocess

MODELS = {"224 px RGB, shorter side + crop": dict(channels=3, input_size=224, resize_policy="shorter_side_center_crop"),
          "224 px RGB, stretch (r18-224)": dict(channels=3, input_size=224, resize_policy="stretch"),
          "28 px grey, stretch": dict(channels=1, input_size=28, resize_policy="stretch")}


def _sklearn_image(name: str) -> Image.Image:
    import sklearn
    return Image.open(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", name))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def photos() -> dict[str, bytes]:
    china = _sklearn_image("china.jpg")
    phone = _jpeg(china.resize((4032, 3024), Image.BICUBIC), quality=95)
    flower = _jpeg(_sklearn_image("flower.jpg").resize((4032, 3024), Image.LANCZOS), quality=92, subsampling="4:2:0")
    with open(china.filename, "rb") as f:
        return {"china.jpg 640x427": f.read(), f"phone 4032x3024 q95 ({len(phone) / 1e6:.1f} MB)": phone,
                f"flower 4032x3024 q92 ({len(flower) / 1e6:.1f} MB)": flower}


def odd_jpegs() -> dict[str, bytes]:
    china = _sklearn_image("china.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    return {"grey": _jpeg(china.convert("L"), quality=90), "progressive": _jpeg(china, quality=90, progressive=True),
            "EXIF orientation 6": _jpeg(china, quality=90, exif=exif), "CMYK (Pillow fallback)": _jpeg(china.convert("CMYK")),
            "4:4:4 big": _jpeg(china.resize((2560, 1708)), quality=90, subsampling="4:4:4")}


class TurboPreprocessor(Preprocessor):
    """``Preprocessor.decode`` with a colour or grey JPEG's pixels from simplejpeg, all else unchanged."""

    def pixels(self, img: Image.Image) -> np.ndarray:
        """An opened RGB or grey JPEG -> (H, W, C) at the size ``draft`` gives it."""
        import simplejpeg
        self._draft(img)
        w, h = img.size  # after draft: libjpeg-turbo picks the same 1/2, 1/4 or 1/8 scale from it
        arr = simplejpeg.decode_jpeg(img.fp.getvalue(), colorspace="RGB" if img.mode == "RGB" else "GRAY",
                                     min_width=w, min_height=h)
        assert arr.shape[:2] == (h, w), (arr.shape, img.size)
        return arr

    def decode(self, img: Image.Image) -> Image.Image:
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or not img.tile:
            return super().decode(img)  # CMYK, not a JPEG, already decoded: Pillow, as served
        arr = self.pixels(img)
        out = Image.fromarray(arr if img.mode == "RGB" else arr[:, :, 0])
        out.info = dict(img.info)  # EXIF orientation
        return self.to_color_mode(ImageOps.exif_transpose(out) or out)


def pipelines(spec: dict) -> tuple[Preprocessor, Preprocessor]:
    pre = make_preprocess(mean=[0.5] * spec["channels"], std=[0.25] * spec["channels"], **spec)
    return Preprocessor.from_manifest(pre), TurboPreprocessor(**vars(Preprocessor.from_manifest(pre)))


def decode_only(pre: Preprocessor, data: bytes) -> np.ndarray | Image.Image:
    """Just the JPEG decode at draft scale, no conversion: Pillow's ``load`` or simplejpeg."""
    img = pre.open(data)
    if isinstance(pre, TurboPreprocessor):
        return pre.pixels(img)
    pre._draft(img)
    img.load()
    return img


def rate(fn: Callable[[bytes], object], data: bytes, seconds: float) -> float:
    """Images per second of this thread's CPU time: time other processes take the core is not counted."""
    n, t0 = 0, time.thread_time()
    while time.thread_time() - t0 < seconds:
        fn(data)
        n += 1
    return n / (time.thread_time() - t0)


def max_diff(a: np.ndarray | Image.Image, b: np.ndarray | Image.Image) -> int:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per decoder per round")
    args = p.parse_args(argv)
    load = lambda: " ".join(open("/proc/loadavg").read().split()[:3])  # noqa: E731
    print(f"load average at start {load()}")
    print("| photo | model input | Pillow img/s | simplejpeg img/s | ratio | max abs diff |\n|---|---|---:|---:|---:|---:|")
    stages = {model: pipelines(spec) for model, spec in MODELS.items()}
    stages["decode only (224 px crop's draft scale)"] = tuple(
        lambda d, pre=pre: decode_only(pre, d) for pre in stages["224 px RGB, shorter side + crop"])
    for name, data in photos().items():
        for model, (pil, turbo) in stages.items():
            pil(data), turbo(data)  # warm up
            a, b = [], []
            for _ in range(args.rounds):  # interleaved so drifts in machine load hit both alike
                a.append(rate(pil, data, args.seconds))
                b.append(rate(turbo, data, args.seconds))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {name} | {model} | {ma:.1f} | {mb:.1f} | {mb / ma:.2f} | {max_diff(pil(data), turbo(data))} |",
                  flush=True)
    print(f"load average at end {load()}")
    for name, data in odd_jpegs().items():
        diffs = [max_diff(*(f(data) for f in pipelines(spec))) for spec in MODELS.values()]
        print(f"{name}: max abs diff per model input {diffs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
