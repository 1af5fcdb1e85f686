"""Class-activation maps (CAM, Zhou et al. 2016) from a bundle's feature maps: torch-free.

For a network that ends in global average pooling and one linear layer, the logit of class c is
``sum_k W[c, k] * mean(F[k])`` (+ bias), so ``sum_k W[c, k] * F[k]`` is exactly how much each
position of the last feature maps adds to that logit. The map is upsampled to the model's input
size (bilinear, pixel centres as ``torch.nn.functional.interpolate(align_corners=False)``) and
min-max normalised to [0, 1]. export/ checks these functions against PyTorch; service/ serves them.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

EXPLAIN_SCHEMA_VERSION = 1
FEATURES_OUTPUT = "features"
WEIGHTS_FILE = "cam_weights.npy"


@lru_cache(maxsize=32)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights, half-pixel centres, edges clamped (align_corners=False)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, h, w) -> (N, height, width) float64, bilinear."""
    return _interp_matrix(height, maps.shape[1]) @ maps.astype(np.float64) @ _interp_matrix(width, maps.shape[2]).T


FLAT = 1e-9  # a span below this fraction of the map's magnitude is rounding noise, not evidence


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map min-max scaled to [0, 1]; a flat map (no position matters more) is all zeros."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    varies = span > FLAT * np.abs(maps).max(axis=(1, 2), keepdims=True)
    return np.where(varies, (maps - lo) / np.where(varies, span, 1.0), 0.0)


def class_activation_maps(features: np.ndarray, weights: np.ndarray, classes: np.ndarray,
                          height: int, width: int) -> np.ndarray:
    """features (N, K, h, w), weights (num_classes, K), classes (N,) -> (N, height, width) in [0, 1]."""
    w = weights[np.asarray(classes)].astype(np.float64)               # (N, K)
    raw = np.einsum("nk,nkhw->nhw", w, features.astype(np.float64))  # the class's evidence per position
    return normalise(upsample(raw, height, width))


# -- pictures -----------------------------------------------------------------------------------
def _colormap(heat: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, a blue-cyan-yellow-red ramp (cold = no evidence, red = most)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float64)
    x = np.clip(heat, 0.0, 1.0) * (len(stops) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(stops) - 2)
    t = (x - i)[..., None]
    return (stops[i] * (1 - t) + stops[i + 1] * t).round().astype(np.uint8)


def overlay_png(image: Image.Image, heat: np.ndarray, box: tuple[float, float, float, float],
                opacity: float = 0.5) -> bytes:
    """The heatmap (model input size) laid over ``box``, the part of ``image`` (original size) the
    model saw, blended at ``opacity``; outside the box the image is unchanged. A PNG."""
    base = image.convert("RGB")
    left, top = max(0, round(box[0])), max(0, round(box[1]))
    right, bottom = min(base.width, round(box[2])), min(base.height, round(box[3]))
    region = base.crop((left, top, right, bottom))
    colour = Image.fromarray(_colormap(heat), "RGB").resize(region.size, Image.BILINEAR)
    base.paste(Image.blend(region, colour, float(opacity)), (left, top))
    out = io.BytesIO()
    base.save(out, format="PNG")
    return out.getvalue()


def heatmap_png(heat: np.ndarray) -> bytes:
    """The heatmap alone, colour-mapped, at the model's input size (for clients that overlay it)."""
    out = io.BytesIO()
    Image.fromarray(_colormap(heat), "RGB").save(out, format="PNG")
    return out.getvalue()
