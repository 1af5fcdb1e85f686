"""The exported module: raw uint8 NHWC pixels in, logits out, with normalisation inside the graph."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class RawPixelClassifier(nn.Module):
    """``image`` uint8 (N, H, W, C) -> ``logits`` float32 (N, num_classes).

    Does ``(p / 255 - mean) / std`` as one multiply-add (``p * scale + shift``) and the NHWC -> NCHW
    transpose, so the service feeds decoded, resized uint8 pixels and never copies mean/std.
    ``dtype`` is the compute dtype (float16 for the GPU export); logits always leave as float32.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        # folded in float64, then rounded once: closer to the reference than two float32 ops
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).to(dtype))
        self.register_buffer("shift", (-mean_t / std_t).to(dtype))
        self.model = model.to(dtype)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # transpose while still uint8 (4x fewer bytes to move), then cast: (N, H, W, C) -> (N, C, H, W)
        x = image.permute(0, 3, 1, 2).to(self.scale.dtype)
        return self.model(x * self.scale + self.shift).float()


def wrap_model(model: nn.Module, preprocess: dict, dtype: torch.dtype = torch.float32) -> RawPixelClassifier:
    """Wrap an eval-mode model with the checkpoint's ``preprocess`` mean/std (eval mode)."""
    return RawPixelClassifier(model, preprocess["mean"], preprocess["std"], dtype=dtype).eval()
