"""Training's transforms over the one decode/preprocess pipeline (``imgformat.preprocess``).

``eval_transform`` is the reference the served model is compared with: the pipeline's uint8
pixels (the very code the service runs), then scaling and mean/std as the bundle's graph does.
``train_transform`` decodes the same way and only adds augmentation in the geometric step.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from torchvision import transforms as T

from imgformat.preprocess import Preprocessor

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


class Pixels:
    """PIL image (any mode, opened or decoded) -> uint8 (H, W, C), exactly as the service computes it."""

    def __init__(self, pre: dict[str, Any]) -> None:
        self.pipeline = Preprocessor.from_manifest(pre)

    def __call__(self, img: Image.Image) -> np.ndarray:
        # a writable copy: the pipeline's array views PIL's buffer, which torch.from_numpy warns about
        return np.array(self.pipeline.finish(img))


class Decode:
    """PIL image -> decoded PIL image in the model's colour mode (EXIF, alpha, 16-bit), not resized."""

    def __init__(self, pre: dict[str, Any]) -> None:
        self.pipeline = Preprocessor.from_manifest(pre)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.pipeline.decode(img)


class Resize:
    """Decoded PIL image -> PIL image of the input size, by the pipeline's resize policy."""

    def __init__(self, pre: dict[str, Any]) -> None:
        self.pipeline = Preprocessor.from_manifest(pre)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.pipeline.resize(img)


def eval_transform(pre: dict[str, Any]) -> T.Compose:
    """PIL image (any mode) -> normalised float tensor (C, H, W): the reference eval pipeline."""
    return T.Compose([Pixels(pre), T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])


def train_transform(pre: dict[str, Any], augment: bool, hflip: bool) -> T.Compose:
    """Training transform: the eval pipeline with light augmentation in the geometric step.

    stretch (small images): resize, then a random crop with padding of 1/8 of the side (4 px at 32);
    photos: a random resized crop. Horizontal flips only when they keep the label. Decoding
    (EXIF, 16-bit, alpha, draft) is the pipeline's in both cases.
    """
    if not augment:
        return eval_transform(pre)
    size = pre["input_size"]
    if pre["resize_policy"] == "stretch":
        geometric = [Resize(pre), T.RandomCrop(size, padding=max(1, size // 8))]
    else:
        geometric = [T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=_INTERPOLATION[pre["interpolation"]])]
    return T.Compose([
        Decode(pre),
        *geometric,
        *([T.RandomHorizontalFlip()] if hflip else []),
        T.ToTensor(),
        T.Normalize(pre["mean"], pre["std"]),
    ])
