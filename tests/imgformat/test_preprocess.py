"""The pipeline's resize/crop equals torchvision's Resize/CenterCrop, its decode policies hold, and
it refuses bad uploads.

No server here: ``imgformat.preprocess.Preprocessor`` against torchvision's transforms pixel by
pixel on real images (sklearn's photos), after the pipeline's own decode (the shared truth).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from torchvision import transforms as T

from imgformat.preprocess import ImageError, Preprocessor, to_color_mode
from imgformat.spec import make_preprocess
from training.transforms import _INTERPOLATION

MAX_PIXELS = 4_000_000


def _photo(name: str = "china.jpg") -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))  # RGB 640x427


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _reference_uint8(pre: dict, img: Image.Image) -> np.ndarray:
    """torchvision's Resize (+ CenterCrop) on the colour-converted image: (H, W, C) int32."""
    interp, size = _INTERPOLATION[pre["interpolation"]], pre["input_size"]
    geometry = T.Resize((size, size), interpolation=interp) if pre["resize_policy"] == "stretch" else \
        T.Compose([T.Resize(pre["resize_size"], interpolation=interp), T.CenterCrop(size)])
    a = np.asarray(geometry(to_color_mode(img, pre["color_mode"], pre["alpha_background"])), dtype=np.int32)
    return a[:, :, None] if a.ndim == 2 else a


PRESETS = {
    "rgb_crop224": make_preprocess(channels=3, input_size=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                                   resize_policy="shorter_side_center_crop"),
    "rgb_crop_bicubic": make_preprocess(channels=3, input_size=64, mean=[0.5] * 3, std=[0.5] * 3,
                                        resize_policy="shorter_side_center_crop", interpolation="bicubic"),
    "rgb_stretch32": make_preprocess(channels=3, input_size=32, mean=[0.5] * 3, std=[0.25] * 3),
    "gray_stretch28": make_preprocess(channels=1, input_size=28, mean=[0.286], std=[0.353], alpha_background=(255, 255, 255)),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK"])
def test_resize_matches_torchvision_on_png(preset: str, mode: str) -> None:
    pre = PRESETS[preset]
    src = _photo().crop((0, 0, 517, 413))  # odd sizes: rounding of the crop offsets matters
    if mode in ("RGBA", "LA"):
        src = src.convert("RGBA")
        alpha = np.tile(np.linspace(0, 255, src.width, dtype=np.uint8), (src.height, 1))
        src.putalpha(Image.fromarray(alpha))
        src = src.convert(mode)
    elif mode == "P":
        src = src.convert("P", palette=Image.Palette.ADAPTIVE)
        src.info["transparency"] = 0
    else:
        src = src.convert(mode)
    data = _encode(src, "TIFF" if mode == "CMYK" else "PNG")
    served = Preprocessor.from_manifest(pre, max_pixels=MAX_PIXELS)(data).astype(np.int32)
    ref = _reference_uint8(pre, Image.open(io.BytesIO(data)))
    assert served.shape == ref.shape, (served.shape, ref.shape)
    diff = np.abs(served - ref)
    # Resizing only the crop box rounds filter positions slightly differently: a handful of pixels
    # may be one grey level off (measured: 0.009 % of china.jpg's crop), never more.
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (
        f"{preset}/{mode}: pipeline differs from torchvision Resize/CenterCrop: max {diff.max()}, {(diff > 0).mean():.4%} of pixels")


def test_jpeg_draft_changes_pixels_by_little() -> None:
    """A big JPEG decoded at reduced scale stays within a few grey levels of the full decode."""
    pre = PRESETS["rgb_stretch32"]
    big = _photo().resize((2560, 1708), Image.BICUBIC)
    data = _encode(big, "JPEG", quality=90)
    fast = Preprocessor.from_manifest(pre, max_pixels=MAX_PIXELS * 2)(data).astype(np.int32)
    full = Preprocessor.from_manifest(pre, max_pixels=MAX_PIXELS * 2, draft=False)(data).astype(np.int32)
    diff = np.abs(fast - full)
    assert diff.mean() < 1.0 and diff.max() <= 8, f"draft decode drifts: mean {diff.mean():.2f}, max {diff.max()}"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "GIF", "PNG"])
def test_formats_decode(fmt: str) -> None:
    pre = PRESETS["rgb_crop224"]
    kw = {"progressive": True} if fmt == "JPEG" else {}
    out = Preprocessor.from_manifest(pre, max_pixels=MAX_PIXELS)(_encode(_photo(), fmt, **kw))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_exif_orientation_applied() -> None:
    pre = make_preprocess(channels=3, input_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: white ends up on top
    out = Preprocessor.from_manifest(pre, max_pixels=MAX_PIXELS)(_encode(img, "JPEG", exif=exif, quality=95))
    assert out[:4].mean() > 200 and out[-4:].mean() < 50, "EXIF orientation was not applied"


def test_16bit_scaled_not_clipped() -> None:
    pre = PRESETS["gray_stretch28"]
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    data = _encode(Image.fromarray(ramp), "PNG")
    out = Preprocessor.from_manifest(pre, max_pixels=MAX_PIXELS)(data)
    assert out[:, 0].mean() < 10 and out[:, -1].mean() > 245 and 100 < out.mean() < 155, "16-bit grey must map by range"


def test_gif_first_frame() -> None:
    pre = PRESETS["gray_stretch28"]
    frames = [Image.new("L", (30, 30), v) for v in (10, 240)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = Preprocessor.from_manifest(pre, max_pixels=MAX_PIXELS)(buf.getvalue())
    assert abs(int(out.mean()) - 10) <= 2, "animated GIF: the first frame is the one classified"


@pytest.mark.parametrize("data,status,kind", [
    (b"", 400, "not_an_image"),
    (b"hello, world" * 10, 400, "not_an_image"),
    ("truncated", 400, "corrupt_image"),
    ("bomb", 413, "too_many_pixels"),
    ("eps", 400, "not_an_image"),
])
def test_bad_uploads_refused(data, status: int, kind: str) -> None:
    pre = PRESETS["rgb_crop224"]
    if data == "truncated":
        full = _encode(_photo(), "JPEG")
        data = full[: len(full) // 2]
    elif data == "bomb":  # 5000 x 5000 = 25 Mpx in a tiny PNG
        data = _encode(Image.new("L", (5000, 5000)), "PNG")
    elif data == "eps":
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(ImageError) as err:
        Preprocessor.from_manifest(pre, max_pixels=MAX_PIXELS)(data)
    assert (err.value.status, err.value.kind) == (status, kind), str(err.value)
