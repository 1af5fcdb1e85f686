"""Real request payloads for load tests, built once in memory from data that is always present.

Kinds: small digit PNGs (scikit-learn's bundled digits, upscaled to 28 px), Fashion-MNIST test images
as PNG (when Debian's dataset-fashion-mnist is installed), and real JPEG photos (scikit-learn's
china.jpg and flower.jpg) resized so the longer side is 300 to 2000 px. Bad inputs are built here
too, each with the status codes issue 5's error table allows for it.
"""
from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

FASHION_DIR = os.environ.get("IMGSERVE_FASHION_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PHOTO_SIDES = (300, 640, 1000, 2000)
BOUNDARY = "imgservLoadBoundary9f3c2a"


@dataclass(frozen=True)
class Payload:
    """One image file as a client would upload it."""

    name: str           # stable id, also the locust request-name suffix: "digit_png", "photo_jpeg_2000"
    kind: str           # "digit_png" | "fashion_png" | "photo_jpeg"
    filename: str
    content_type: str
    data: bytes
    true_label: str | None = None   # ground truth when the source dataset has one (for reporting only)


@dataclass(frozen=True)
class BadCase:
    """A deliberately wrong request and the statuses the API contract allows for it."""

    name: str
    expected: frozenset[int]
    files: tuple[tuple[str, tuple[str, bytes, str]], ...]   # (field, (filename, bytes, content type))
    form: dict[str, str] = field(default_factory=dict)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def digit_pngs(n: int = 10) -> list[Payload]:
    """sklearn digits (8x8, 0..16) as 28x28 grayscale PNGs, one per class first."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out: list[Payload] = []
    for label in range(10):
        idx = int(np.flatnonzero(d.target == label)[0])
        px = (d.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(px).resize((28, 28), Image.BILINEAR))
        out.append(Payload(f"digit_png_{label}", "digit_png", f"digit{label}.png", "image/png", _png(big), str(label)))
    return out[:n]


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_pngs(n: int = 20, data_dir: str = FASHION_DIR) -> list[Payload]:
    """The first n Fashion-MNIST test images as 28x28 PNGs; empty when the dataset is absent."""
    img_path = os.path.join(data_dir, "t10k-images-idx3-ubyte.gz")
    lab_path = os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz")
    if not (os.path.exists(img_path) and os.path.exists(lab_path)):
        log.info("Fashion-MNIST not at %s (apt-get install dataset-fashion-mnist); using digits and photos only", data_dir)
        return []
    images, labels = _read_idx(img_path), _read_idx(lab_path)
    return [Payload(f"fashion_png_{i}", "fashion_png", f"fashion{i}.png", "image/png", _png(images[i]),
                    FASHION_CLASSES[int(labels[i])]) for i in range(min(n, len(images)))]


def photo_jpegs(sides: tuple[int, ...] = PHOTO_SIDES) -> list[Payload]:
    """china.jpg and flower.jpg (640x427) resized so the longer side is each of `sides`, as JPEG."""
    from sklearn.datasets import load_sample_image

    out: list[Payload] = []
    for stem in ("china", "flower"):
        base = Image.fromarray(load_sample_image(f"{stem}.jpg"))
        for side in sides:
            scale = side / max(base.size)
            size = (max(1, round(base.size[0] * scale)), max(1, round(base.size[1] * scale)))
            if size == base.size:   # the original file, byte for byte (the peers' benchmark image)
                with open(sample_photo_path(stem), "rb") as fh:
                    data = fh.read()
            else:
                data = _jpeg(base.resize(size, Image.BICUBIC))
            out.append(Payload(f"photo_jpeg_{stem}_{side}", "photo_jpeg", f"{stem}_{side}.jpg", "image/jpeg", data))
    return out


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # displayed rotated/flipped: the pixels must be turned before resizing
    return _encode(img, "JPEG", quality=90, exif=exif)


def _rgba(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, img.width, dtype=np.uint8), (img.height, 1))))
    return rgba


def _png16(img: Image.Image) -> Image.Image:
    grey = np.asarray(img.convert("L"), dtype=np.uint16)
    return Image.fromarray(grey * 257 + np.arange(grey.shape[1], dtype=np.uint16) % 200)  # low byte busy too


def _animated_gif(img: Image.Image) -> bytes:
    frames = [img.convert("P", palette=Image.Palette.ADAPTIVE), img.rotate(180).convert("P", palette=Image.Palette.ADAPTIVE)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


# name -> (how the decode path's file is made from china.jpg (640x427 RGB), content type)
DECODE_PATHS = {
    "rgb_jpeg": (lambda im: _encode(im, "JPEG", quality=90), "image/jpeg"),
    "progressive_jpeg": (lambda im: _encode(im, "JPEG", quality=90, progressive=True), "image/jpeg"),
    "exif3_jpeg": (lambda im: _exif_jpeg(im, 3), "image/jpeg"),
    "exif6_jpeg": (lambda im: _exif_jpeg(im, 6), "image/jpeg"),
    "exif8_jpeg": (lambda im: _exif_jpeg(im, 8), "image/jpeg"),
    "cmyk_jpeg": (lambda im: _encode(im.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
    "large_jpeg": (lambda im: _encode(im.resize((4000, 3000), Image.BILINEAR), "JPEG", quality=85), "image/jpeg"),
    "grey_png": (lambda im: _encode(im.convert("L"), "PNG"), "image/png"),
    "palette_png": (lambda im: _encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "image/png"),
    "rgba_png": (lambda im: _encode(_rgba(im), "PNG"), "image/png"),
    "png16": (lambda im: _encode(_png16(im), "PNG"), "image/png"),
    "webp": (lambda im: _encode(im, "WEBP", quality=90), "image/webp"),
    "animated_gif": (_animated_gif, "image/gif"),
}


def decode_paths(names: tuple[str, ...] | None = None) -> list[Payload]:
    """One file per decode path of the pipeline (docs/FORMATS.md), all made from china.jpg: EXIF
    orientations 3/6/8, CMYK, a 4000x3000 JPEG (the reduced-scale draft decode), grey, palette and
    RGBA PNG, 16-bit grey PNG, WebP, animated GIF (first frame). For parity tests and load tests."""
    from sklearn.datasets import load_sample_image

    base = Image.fromarray(load_sample_image("china.jpg"))
    out = []
    for name in names or tuple(DECODE_PATHS):
        make, ctype = DECODE_PATHS[name]
        ext = ctype.split("/")[1]
        out.append(Payload(name, "decode_path", f"{name}.{ext}", ctype, make(base)))
    return out


def sample_photo_path(stem: str = "china") -> str:
    """Path of scikit-learn's bundled photo (the benchmark's default image)."""
    import sklearn

    return os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", f"{stem}.jpg")


def _bomb_png(side: int = 16000) -> bytes:
    """A valid PNG header announcing side x side pixels (grayscale), whose zero rows compress to ~0.1 %.

    Streamed through zlib row by row so building it never holds the pixels in memory.
    """
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = bytes(side + 1)   # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_cases(good: Payload) -> list[BadCase]:
    """Requests that must fail with a 4xx, per issue 5's error table (status sets are the allowed ones)."""
    half = good.data[: len(good.data) // 2]
    img = ("image", (good.filename, good.data, good.content_type))
    return [
        BadCase("not_image", frozenset({400}), (("image", ("notes.txt", b"this is not an image\n" * 20, "text/plain")),)),
        BadCase("empty_file", frozenset({400}), (("image", ("empty.png", b"", "image/png")),)),
        BadCase("truncated_jpeg", frozenset({400}), (("image", ("cut.jpg", half, "image/jpeg")),)),
        BadCase("missing_image_field", frozenset({400, 422}), (("file", (good.filename, good.data, good.content_type)),)),
        BadCase("pixel_bomb_png", frozenset({413}), (("image", ("bomb.png", _bomb_png(), "image/png")),)),
        BadCase("unknown_model", frozenset({404}), (img,), {"model": "no-such-model"}),
        BadCase("top_k_zero", frozenset({400, 422}), (img,), {"top_k": "0"}),
        BadCase("top_k_not_int", frozenset({400, 422}), (img,), {"top_k": "five"}),
    ]


def multipart(fields: dict[str, str], files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    """Build a multipart/form-data body by hand (locust's FastHttpUser and wrk need raw bytes); returns (body, content type)."""
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in fields.items()]
    for name, (filename, data, ctype) in files:
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={BOUNDARY}"


@dataclass(frozen=True)
class PayloadSet:
    small: tuple[Payload, ...]     # digit and Fashion-MNIST PNGs
    photos: tuple[Payload, ...]    # JPEG photos, 300..2000 px
    bad: tuple[BadCase, ...]

    @property
    def all_good(self) -> tuple[Payload, ...]:
        return self.small + self.photos


@lru_cache(maxsize=1)
def load_payloads() -> PayloadSet:
    """Every payload, built once per process (about a second)."""
    small = tuple(digit_pngs() + fashion_pngs())
    photos = tuple(photo_jpegs())
    bad = tuple(bad_cases(photos[0]))
    log.info("payloads: %d small PNGs, %d JPEG photos (%d..%d bytes), %d bad cases",
             len(small), len(photos), min(len(p.data) for p in photos), max(len(p.data) for p in photos), len(bad))
    return PayloadSet(small, photos, bad)
