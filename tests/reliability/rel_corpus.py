"""Bad (and surprising but valid) uploads, built in memory from data that is always present.

Each ``Item`` is a complete raw HTTP request (sent by ``loadtests.soak.fire``) with the status the
README's error table documents for it. Images come from scikit-learn (digits, china.jpg), so a fresh
clone needs no data directory.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from loadtests.soak import image_post, multipart, raw_post


@dataclass(frozen=True)
class Item:
    name: str
    request: bytes
    status: int


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@lru_cache(maxsize=1)
def digit() -> Image.Image:
    """One held-out digit, 24x24 grey."""
    from sklearn.datasets import load_digits

    a = (load_digits().images[-1] * (255 / 16)).astype(np.uint8)
    return Image.fromarray(a, "L").resize((24, 24), Image.BILINEAR)


@lru_cache(maxsize=1)
def photo_jpeg() -> bytes:
    from sklearn.datasets import load_sample_image

    return encode(Image.fromarray(load_sample_image("china.jpg")), "JPEG", quality=85)


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png_bomb(side: int = 50_000) -> bytes:
    """A valid-looking PNG declaring side x side pixels in ~70 bytes."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def gif_bomb(side: int = 65_535) -> bytes:
    """A GIF whose logical screen and one frame declare side x side pixels, in ~40 bytes."""
    head = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b";"


def png_corrupt_crc() -> bytes:
    png = bytearray(encode(digit(), "PNG"))
    png[16] ^= 0xFF  # inside IHDR's data: its CRC no longer matches
    return bytes(png)


def png_corrupt_idat() -> bytes:
    """IHDR intact, IDAT replaced by bytes that are not a zlib stream (CRC made valid)."""
    png = encode(digit(), "PNG")
    i = png.index(b"IDAT") - 4
    n = struct.unpack(">I", png[i:i + 4])[0]
    junk = bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8))
    return png[:i] + _chunk(b"IDAT", junk) + png[i + 12 + n:]


def animated_gif() -> bytes:
    frames = [digit(), digit().rotate(90), digit().rotate(180)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def png16() -> bytes:
    a = (np.asarray(digit(), dtype=np.uint16) * 257)
    return encode(Image.fromarray(a), "PNG")  # uint16 -> mode I;16, saved as a 16-bit PNG


def cmyk_jpeg() -> bytes:
    return encode(digit().convert("RGB").convert("CMYK"), "JPEG", quality=95)


def corpus(max_body: int, max_images: int, headers: dict[str, str] | None = None) -> list[Item]:
    """Every case of the brief with its documented status."""
    png = encode(digit(), "PNG")
    jpg = photo_jpeg()
    h = headers or {}
    post = lambda data, **kw: image_post(data, headers=h, **kw)
    items = [
        Item("zero_bytes", post(b""), 400),
        Item("text", post(b"just some text, not an image\n" * 20, ctype="text/plain"), 400),
        Item("truncated_jpeg", post(jpg[: len(jpg) // 2], ctype="image/jpeg"), 400),
        Item("jpeg_header_only", post(jpg[:200], ctype="image/jpeg"), 400),
        Item("png_bad_crc", post(png_corrupt_crc()), 400),
        Item("png_bad_idat", post(png_corrupt_idat()), 400),
        Item("eps", post(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", ctype="application/postscript"), 400),
        Item("png_bomb", post(png_bomb()), 413),
        Item("gif_bomb", post(gif_bomb(), ctype="image/gif"), 413),
        Item("one_by_one", post(encode(Image.new("L", (1, 1), 200), "PNG")), 200),
        Item("one_by_n", post(encode(Image.new("RGB", (1, 300), (9, 99, 199)), "PNG")), 200),
        Item("n_by_one", post(encode(Image.new("L", (300, 1), 77), "PNG")), 200),
        Item("animated_gif", post(animated_gif(), ctype="image/gif"), 200),
        Item("png_16bit", post(png16()), 200),
        Item("cmyk_jpeg", post(cmyk_jpeg(), ctype="image/jpeg"), 200),
        Item("photo_jpeg", post(jpg, ctype="image/jpeg"), 200),
        Item("wrong_part_type", post(png, ctype="text/plain"), 200),  # the bytes decide, not the label
        Item("no_part_type", post(png, ctype=None), 200),
        Item("non_utf8_name", post(png, filename=b"\xff\xfe\x80bad\xc3.png"), 200),
        Item("non_utf8_name_bad_image", image_post(b"\x00\x01", path="/classify_batch", field_name="images",
                                                   filename=b"\xff\xfe.png", headers=h), 400),
        Item("wrong_field", post(png, field_name="picture"), 400),
        Item("text_in_file_field", raw_post("/classify", *multipart([("image", None, b"http://127.0.0.1:1/x.png", None)]), h), 400),
        Item("json_body", raw_post("/classify", b'{"image": "x"}', "application/json", h), 400),
        Item("no_content_type", raw_post("/classify", png, None, h), 400),
        Item("multipart_no_boundary", raw_post("/classify", png, "multipart/form-data", h), 400),
        Item("multipart_garbage", raw_post("/classify", b"--x\r\nnot a part\r\n", "multipart/form-data; boundary=x", h), 400),
        Item("two_files_to_classify", raw_post("/classify", *multipart([("image", b"a.png", png, "image/png")] * 2), h), 413),
        Item("many_files", raw_post("/classify_batch", *multipart([("images", b"a.png", png, "image/png")] * (max_images + 1)), h), 413),
        Item("many_fields", raw_post("/classify", *multipart([("image", b"a.png", png, "image/png")]
                                                             + [(f"f{i}", None, b"v", None) for i in range(200)]), h), 400),
        Item("unknown_model_path", post(png, form={"model": "../../etc/passwd"}), 404),
        Item("batch_ok", raw_post("/classify_batch", *multipart([("images", b"a.png", png, "image/png"),
                                                                  ("images", b"b.jpg", jpg, "image/jpeg")]), h), 200),
    ]
    return items
