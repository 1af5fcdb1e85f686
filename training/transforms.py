"""Preprocessing from a checkpoint's ``preprocess`` dict (docs/FORMATS.md): one source of truth.

``eval_transform`` is the PyTorch reference pipeline that the service must reproduce exactly.
"""
from __future__ import annotations

from typing import Any

from PIL import Image
from torchvision import transforms as T

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def to_color_mode(img: Image.Image, color_mode: str, background=(0, 0, 0)) -> Image.Image:
    """Convert any PIL image to ``color_mode`` ("L" or "RGB"), compositing transparency on ``background``."""
    if img.mode == color_mode:
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        img = Image.alpha_composite(base, rgba)
    return img.convert(color_mode)


def resize_transform(pre: dict[str, Any]) -> T.Compose:
    """PIL -> PIL resize (and crop) as the ``resize_policy`` says."""
    interp = _INTERPOLATION[pre["interpolation"]]
    size = pre["input_size"]
    if pre["resize_policy"] == "stretch":
        return T.Compose([T.Resize((size, size), interpolation=interp)])
    return T.Compose([T.Resize(pre["resize_size"], interpolation=interp), T.CenterCrop(size)])


def eval_transform(pre: dict[str, Any]) -> T.Compose:
    """PIL image (any mode) -> normalised float tensor (C, H, W): the reference eval pipeline."""
    background = tuple(pre.get("alpha_background", (0, 0, 0)))
    return T.Compose([
        T.Lambda(lambda im: to_color_mode(im, pre["color_mode"], background)),
        resize_transform(pre),
        T.ToTensor(),
        T.Normalize(pre["mean"], pre["std"]),
    ])
