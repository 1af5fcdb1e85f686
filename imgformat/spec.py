"""Build the checkpoint's ``preprocess`` dict (docs/FORMATS.md), checked against its schema."""
from __future__ import annotations

from typing import Any, Sequence

from imgformat.constants import INTERPOLATIONS, RESIZE_POLICIES
from imgformat.schema import check_preprocess

# torchvision's ImageNet statistics: the normalisation ImageNet-pretrained weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_stats(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet mean/std for 3 channels, or their average for 1 (grey input to summed RGB filters)."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]


def make_preprocess(*, channels: int, input_size: int, mean: Sequence[float], std: Sequence[float],
                    resize_policy: str = "stretch", resize_size: int | None = None,
                    interpolation: str = "bilinear", alpha_background: Sequence[int] = (0, 0, 0)) -> dict[str, Any]:
    """The ``preprocess`` dict stored in checkpoints; raises ValueError naming the bad argument."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if resize_policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {resize_policy!r}; valid: {', '.join(RESIZE_POLICIES)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values, got {mean} / {std}")
    if resize_size is None:
        resize_size = input_size if resize_policy == "stretch" else round(input_size / 0.875)
    pre = {
        "color_mode": "L" if channels == 1 else "RGB", "channels": channels, "input_size": int(input_size),
        "resize_policy": resize_policy, "resize_size": int(resize_size), "interpolation": interpolation,
        "mean": mean, "std": std, "alpha_background": [int(c) for c in alpha_background],
    }
    check_preprocess(pre, error=ValueError)
    return pre
