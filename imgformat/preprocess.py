"""Upload bytes -> uint8 pixels (H, W, C): the one decode/preprocess pipeline (docs/FORMATS.md).

The bundle's model files take raw uint8 NHWC pixels and normalise inside the graph, so this only
decodes, converts the colour mode and resizes/crops, all in uint8 with PIL and NumPy (no torch).
Everything comes from the checkpoint's ``preprocess`` / the manifest's ``preprocessing``.

The policies, each decided here once and applied identically to training (eval transform and
train-time loading), export's parity/calibration samples, the service and the load tests
(docs/FORMATS.md, "One decode pipeline, its policies decided once"): EXIF orientation applied; only the first frame of an animated
image; 16-bit grey keeps its high byte (as Pillow does for 16-bit colour PNGs); transparency
composited on the preprocess dict's ``alpha_background``; big JPEGs decoded at reduced DCT scale
(``draft``); ICC profiles ignored.

Reproducing torchvision's Resize/CenterCrop:
- ``Resize(n)`` keeps the aspect ratio with ``long = int(n * long / short)``; ``CenterCrop`` starts at
  ``int(round((side - crop) / 2))``. Resizing the whole image and then cropping equals resizing
  only the crop box with ``Image.resize(box=...)`` (same filter centres and scale), which skips the
  pixels the crop throws away.
- JPEGs are decoded at a reduced DCT scale (``Image.draft``) only down to at least twice the size
  the resize needs, so the bilinear/bicubic filter still averages many source pixels and the
  result stays within a few grey levels of a full decode (at most 4 on a 4000x3000 photo, mean
  0.26). Training decodes the same way, so a model learns the pixels it is served.
"""
from __future__ import annotations

import io
import logging
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}
# Formats a real upload may be in; anything else PIL can open (EPS, ICNS, ...) is refused.
Image.init()
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM") if f in Image.OPEN)
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
DEFAULT_MAX_PIXELS = 40_000_000  # the service's IMGSERVE_MAX_PIXELS default; training uses it too

# A truncated image must be an error, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """A user's upload that cannot be classified. ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_image") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Preprocessor:
    """Turns one upload into the model's input, as the manifest's ``preprocessing`` says."""

    color_mode: str
    input_size: int
    resize_policy: str
    resize_size: int
    interpolation: str
    alpha_background: tuple[int, int, int]
    max_pixels: int
    draft: bool = True

    @classmethod
    def from_manifest(cls, pre: dict[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                      draft: bool = True) -> "Preprocessor":
        """From a manifest's ``preprocessing`` or a checkpoint's ``preprocess`` (same keys)."""
        if pre["interpolation"] not in _FILTERS:
            raise ValueError(f"unsupported interpolation {pre['interpolation']!r}; valid: {', '.join(_FILTERS)}")
        if pre["resize_policy"] not in ("stretch", "shorter_side_center_crop"):
            raise ValueError(f"unsupported resize_policy {pre['resize_policy']!r}")
        return cls(color_mode=pre["color_mode"], input_size=int(pre["input_size"]),
                   resize_policy=pre["resize_policy"], resize_size=int(pre.get("resize_size", pre["input_size"])),
                   interpolation=pre["interpolation"],
                   alpha_background=tuple(int(c) for c in pre.get("alpha_background", (0, 0, 0))),
                   max_pixels=int(max_pixels), draft=draft)

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.input_size, self.input_size, self.channels)

    # -- the steps -------------------------------------------------------------------------
    def open(self, data: bytes | io.BufferedIOBase) -> Image.Image:
        """Identify the image and check its size without decoding its pixels."""
        fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp, formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"image has more than {self.max_pixels} pixels", 413, "too_many_pixels") from None
        except UnidentifiedImageError:
            raise ImageError("not an image in a supported format (JPEG, PNG, WebP, BMP, GIF, TIFF, PPM)",
                             400, "not_an_image") from None
        except Exception as e:  # PIL raises many kinds on a broken header
            raise ImageError(f"unreadable image header: {e}", 400, "corrupt_image") from None
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageError(f"image has an empty size {w}x{h}", 400, "corrupt_image")
        if w * h > self.max_pixels:
            raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the limit of {self.max_pixels}",
                             413, "too_many_pixels")
        return img

    def _draft(self, img: Image.Image) -> None:
        """Decode big JPEGs at 1/2, 1/4 or 1/8 scale, never below twice the size the resize needs."""
        if not self.draft or img.format not in ("JPEG", "MPO"):
            return
        need = 2 * (self.resize_size if self.resize_policy == "shorter_side_center_crop" else self.input_size)
        w, h = img.size
        # Both sides must stay >= `need`: for a shorter-side policy only the shorter side matters,
        # but requesting a square keeps it valid whatever the EXIF orientation does to the sides.
        if min(w, h) >= 2 * need:
            img.draft(img.mode, (need, need))

    def decode(self, img: Image.Image) -> Image.Image:
        """Load pixels (first frame), apply EXIF orientation, convert to the model's colour mode.

        Idempotent: an image it returned comes back unchanged, so training can decode in its
        dataset (where a bad file is skipped) and again in its transforms."""
        self._draft(img)
        try:
            img.load()
            img = ImageOps.exif_transpose(img) or img
        except Image.DecompressionBombError:
            raise ImageError(f"image has more than {self.max_pixels} pixels", 413, "too_many_pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            raise ImageError(f"truncated or corrupt image: {e}", 400, "corrupt_image") from None
        return self.to_color_mode(img)

    def to_color_mode(self, img: Image.Image) -> Image.Image:
        return to_color_mode(img, self.color_mode, self.alpha_background)

    def decode_bytes(self, data: bytes) -> Image.Image:
        """File bytes -> decoded image in the model's colour mode, not resized (training's loading)."""
        return self.decode(self.open(data))

    def resize(self, img: Image.Image) -> Image.Image:
        """Resize (and centre-crop) as torchvision's Resize/CenterCrop on PIL images do."""
        size, resample = self.input_size, _FILTERS[self.interpolation]
        w, h = img.size
        if self.resize_policy == "stretch":
            return img if (w, h) == (size, size) else img.resize((size, size), resample)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        if nw < size or nh < size:  # torchvision pads then crops; rare (resize_size < input_size)
            img = img.resize((nw, nh), resample)
            return _center_crop_padded(img, size)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), resample, box=box)

    def input_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        """The region of a ``w`` x ``h`` image the model sees, in its pixels (where a heatmap goes)."""
        if self.resize_policy == "stretch":
            return (0.0, 0.0, float(w), float(h))
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        size = self.input_size
        left, top = (nw - size) / 2.0, (nh - size) / 2.0
        sx, sy = w / nw, h / nh
        return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """PIL image -> uint8 (H, W, C), C = channels."""
        a = np.asarray(img, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.shape != self.shape:  # an internal invariant: resize() guarantees the shape
            raise AssertionError(f"preprocessed shape {a.shape} != {self.shape}")
        return a

    def __call__(self, data: bytes | io.BufferedIOBase) -> np.ndarray:
        """Upload -> uint8 (H, W, C). Raises ImageError (with an HTTP status) for a bad upload."""
        return self.finish(self.open(data))

    def finish(self, img: Image.Image) -> np.ndarray:
        """An opened image (``open``) -> uint8 (H, W, C): decode, colour mode, resize."""
        img = self.decode(img)
        try:
            img = self.resize(img)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot resize image: {e}", 400, "corrupt_image") from None
        return self.to_array(img)


def to_color_mode(img: Image.Image, color_mode: str, background: Sequence[int] = (0, 0, 0)) -> Image.Image:
    """Any PIL mode -> ``color_mode`` ("L"/"RGB"): high-depth grey by range, transparency
    composited on ``background``, everything else by PIL's conversion (CMYK, YCbCr, P, 1, ...)."""
    if img.mode == color_mode:
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_l(img)
        return img if color_mode == "L" else img.convert(color_mode)
    if img.mode in _TRANSPARENT_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        img = Image.alpha_composite(base, rgba)
    return img.convert(color_mode)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey -> 8-bit by its high byte, not by clipping (PIL's convert clips at 255).

    The high byte (v >> 8) is what Pillow itself keeps of 16-bit colour PNGs, so a 16-bit grey and a
    16-bit RGB scan of the same page get the same 8-bit pixels. 32-bit integers are read as 16-bit
    values (clipped to 0..65535); float images as 0..255."""
    a = np.asarray(img)
    if img.mode == "F":
        a8 = np.clip(a, 0, 255).astype(np.uint8)
    else:
        a8 = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(a8, mode="L")


def _center_crop_padded(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    pad_l, pad_t = max(size - w, 0) // 2, max(size - h, 0) // 2
    canvas = Image.new(img.mode, (max(w, size), max(h, size)), 0)
    canvas.paste(img, (pad_l, pad_t))
    w2, h2 = canvas.size
    left, top = int(round((w2 - size) / 2.0)), int(round((h2 - size) / 2.0))
    return canvas.crop((left, top, left + size, top + size))


def stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """List of (H, W, C) or (n, H, W, C) uint8 arrays -> one contiguous (N, H, W, C) batch."""
    if len(arrays) == 1 and arrays[0].ndim == 4:
        return np.ascontiguousarray(arrays[0])
    return np.concatenate([a if a.ndim == 4 else a[None] for a in arrays], axis=0)
