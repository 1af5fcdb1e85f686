"""Training sees the pixels serving sees, on every decode path (no train/serve skew).

Four consumers of one file: the service (``Preprocessor`` on the upload bytes), training's eval
transform (on the opened file), training's loading of an image folder (``FileImageDataset`` with
the pipeline's decoder, then the eval transform), and export's parity/calibration samples
(``export.samples.from_dir``). All must give the same uint8 pixels, exactly: EXIF orientation,
16-bit grey, alpha, palette, CMYK, first GIF frame and the reduced-scale decode of a 4000x3000 JPEG
are decided once. Before imgformat, training rotated nothing, clipped 16-bit grey at 255 and decoded
big JPEGs in full while the service did otherwise.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.samples import from_dir
from imgformat.preprocess import Preprocessor
from imgformat.spec import IMAGENET_MEAN, IMAGENET_STD, make_preprocess
from loadtests.payloads import DECODE_PATHS, decode_paths
from training.datasets import FileImageDataset
from training.transforms import eval_transform

PRESETS = {
    "rgb224_crop": make_preprocess(channels=3, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                   resize_policy="shorter_side_center_crop"),
    "grey28_stretch": make_preprocess(channels=1, input_size=28, mean=[0.286], std=[0.353]),
}


@pytest.fixture(scope="module")
def payloads() -> dict:
    return {p.name: p for p in decode_paths()}


@pytest.fixture(scope="module")
def files(payloads) -> dict[str, bytes]:
    return {name: p.data for name, p in payloads.items()}


def _uint8(pre: dict, x) -> np.ndarray:
    """A normalised (C, H, W) tensor back to the uint8 pixels it came from: (H, W, C)."""
    mean, std = np.array(pre["mean"])[:, None, None], np.array(pre["std"])[:, None, None]
    return np.round((x.numpy().astype(np.float64) * std + mean) * 255.0).transpose(1, 2, 0).astype(np.uint8)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("path", list(DECODE_PATHS))
def test_training_eval_and_loading_see_the_served_pixels(payloads, files, tmp_path: Path, preset: str,
                                                          path: str) -> None:
    pre, data = PRESETS[preset], files[path]
    served = Preprocessor.from_manifest(pre)(data)
    evaluated = _uint8(pre, eval_transform(pre)(Image.open(io.BytesIO(data))))
    assert np.array_equal(evaluated, served), f"{path}: eval_transform differs from serving by " \
                                              f"{np.abs(evaluated.astype(int) - served).max()} levels"
    f = tmp_path / "c0" / payloads[path].filename
    f.parent.mkdir()
    f.write_bytes(data)
    ds = FileImageDataset([f], [0], decode=Preprocessor.from_manifest(pre).decode_bytes)
    loaded = _uint8(pre, eval_transform(pre)(ds[0][0]))
    assert np.array_equal(loaded, served), f"{path}: training's file loading differs from serving"
    sample = from_dir(tmp_path, pre, ["c0"], 1).images[0]
    assert np.array_equal(sample, served), f"{path}: export's samples differ from serving"


def test_exif_rotation_reaches_training(files) -> None:
    """Orientation 6 turns the 640x427 photo upright: 427 wide, 640 high, in training as in serving."""
    pre = PRESETS["rgb224_crop"]
    img = Preprocessor.from_manifest(pre).decode_bytes(files["exif6_jpeg"])
    assert img.size == (427, 640), img.size


def test_16bit_grey_keeps_its_range_in_training(files) -> None:
    pre = PRESETS["grey28_stretch"]
    x = _uint8(pre, eval_transform(pre)(Image.open(io.BytesIO(files["png16"]))))
    ref = Preprocessor.from_manifest(pre)(files["grey_png"])  # the same picture in 8 bits
    assert np.abs(x.astype(int) - ref).max() <= 2, "16-bit grey must map to the 8-bit picture (high byte), not clip"


def test_a_training_run_loads_folder_images_as_served(tmp_path: Path) -> None:
    """training.train's set-up wires the pipeline into the folder dataset: an EXIF-rotated photo
    arrives upright, before any transform, and its pixels are the served ones."""
    from training.train import TrainConfig, _prepare

    base = Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (48, 1)))  # 96 x 48
    exif = Image.Exif()
    exif[0x0112] = 6
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            base.convert("RGB").save(tmp_path / cls / f"{i}.jpg", exif=exif)
    s = _prepare(TrainConfig(model="simple_cnn", dataset="folder", data_dir=str(tmp_path), image_size=16,
                             epochs=1, device="cpu", out=str(tmp_path / "run")))
    img, _ = s.splits.train[0]
    assert img.size == (48, 96), f"training loaded the photo unrotated: {img.size}"
    served = Preprocessor.from_manifest(s.preprocess)((tmp_path / "a" / "0.jpg").read_bytes())
    assert np.array_equal(_uint8(s.preprocess, eval_transform(s.preprocess)(img)), served)
