"""Real samples for the parity gate and INT8 calibration, as the service will feed them.

Each image goes through the one decode/preprocess pipeline (``imgformat.preprocess``, the code the
service runs) with the checkpoint's ``preprocess`` and stays uint8, (N, H, W, C): files are decoded
from their bytes exactly as an upload is, so the parity gate sees the served pixels.
Sources, first that applies: an explicit ``--samples DIR``; the checkpoint's dataset
(``training.datasets``); random pixels, with a warning (the gate then proves the maths, not the data).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgformat.preprocess import ImageError, Preprocessor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class SamplesError(ValueError):
    """A samples directory or dataset that cannot give the requested images."""


@dataclass
class Samples:
    images: np.ndarray            # (N, H, W, C) uint8, ready for the bundle's model files
    labels: np.ndarray | None     # (N,) int64 class indices when known
    source: str                   # where they came from, recorded in the manifest

    def __len__(self) -> int:
        return len(self.images)


def _stack(images: list[Image.Image], pre: dict[str, Any]) -> np.ndarray:
    pipeline = Preprocessor.from_manifest(pre)
    return np.stack([pipeline.finish(im) for im in images]).astype(np.uint8)


def _take(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices keeping class proportions when labels are known (seeded)."""
    from training.datasets import stratified_take

    return stratified_take(labels, n, seed)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def from_dataset(ckpt: dict[str, Any], split: str, n: int, *, data_dir: str | None = None,
                 seed: int = 0) -> Samples | None:
    """``n`` samples of ``split`` ("train"/"val"/"test") of the checkpoint's dataset; None if unreachable."""
    info = dict(ckpt.get("dataset") or {})
    if not info.get("name"):
        log.warning("checkpoint records no dataset name; cannot take real samples from it")
        return None
    if data_dir is not None:
        info["data_dir"] = str(data_dir)
    try:
        from training.datasets import DatasetError, get_dataset_from_info, use_pipeline
    except ImportError as e:  # the training stage is part of this repo; only a broken install lands here
        log.warning("training.datasets is not importable (%s); no dataset samples", e)
        return None
    try:
        splits = get_dataset_from_info(info)
    except DatasetError as e:
        log.warning("dataset %r unreachable (%s)", info["name"], e)
        return None
    use_pipeline(splits, Preprocessor.from_manifest(ckpt["preprocess"]).decode_bytes)  # as training loaded them
    ds = getattr(splits, split)
    idx = _take(np.asarray(ds.labels), n, seed)
    pairs = [ds[int(i)] for i in idx]
    return Samples(_stack([p[0] for p in pairs], ckpt["preprocess"]), np.array([p[1] for p in pairs], dtype=np.int64),
                   f"dataset {info['name']} ({split} split)")


def _list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def from_dir(root: str | Path, pre: dict[str, Any], class_names: list[str], n: int, *,
             part: str | None = None, seed: int = 0) -> Samples:
    """Images under ``root`` (recursively). Labelled when their parent folder is a class name.

    ``part``: "calib" / "eval" for INT8. A ``train/`` + ``test/`` layout gives those folders;
    otherwise the shuffled files are cut in two disjoint halves so calibration never sees eval images.
    """
    root = Path(root)
    if not root.is_dir():
        raise SamplesError(f"--samples {root} is not a directory of images")
    sub = {"calib": "train", "eval": "test"}.get(part or "")
    if sub and (root / "train").is_dir() and (root / "test").is_dir():
        root, part = root / sub, None
    paths = _list_images(root)
    rng = np.random.default_rng(seed)
    paths = [paths[i] for i in rng.permutation(len(paths))]
    if part is not None:
        half = len(paths) // 2
        paths = paths[:half] if part == "calib" else paths[half:]
    index = {c: i for i, c in enumerate(class_names)}
    pipeline = Preprocessor.from_manifest(pre)
    arrays, labels = [], []
    for p in paths:
        if len(arrays) >= n:
            break
        try:
            arrays.append(pipeline(p.read_bytes()))  # the upload path: bytes -> uint8 (H, W, C)
        except (ImageError, OSError) as e:
            log.warning("skipping unreadable sample %s (%s)", p, e)
            continue
        labels.append(index.get(p.parent.name, -1))
    if not arrays:
        raise SamplesError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    lab = np.array(labels, dtype=np.int64)
    return Samples(np.stack(arrays), lab if (lab >= 0).all() else None, f"directory {root}")


def random_samples(pre: dict[str, Any], n: int, seed: int = 0) -> Samples:
    """Uniform random uint8 pixels: proves the graph maths only."""
    size, c = pre["input_size"], pre["channels"]
    rng = np.random.default_rng(seed)
    return Samples(rng.integers(0, 256, size=(n, size, size, c), dtype=np.uint8), None, "random uint8 (no real data)")


def resolve_samples(ckpt: dict[str, Any], n: int, *, split: str = "test", samples_dir: str | None = None,
                    data_dir: str | None = None, part: str | None = None, allow_random: bool = True,
                    seed: int = 0) -> Samples:
    """Pick the sample source (explicit dir > checkpoint dataset > random with a warning)."""
    pre = ckpt["preprocess"]
    if samples_dir is not None:
        return from_dir(samples_dir, pre, list(ckpt["class_names"]), n, part=part, seed=seed)
    got = from_dataset(ckpt, split, n, data_dir=data_dir, seed=seed)
    if got is not None:
        return got
    if not allow_random:
        raise SamplesError(f"needs labelled real samples: the checkpoint's dataset "
                           f"{(ckpt.get('dataset') or {}).get('name')!r} is unreachable; pass --data-dir DIR "
                           f"or --samples DIR with one subfolder per class")
    log.warning("no real samples: the parity gate runs on random pixels (pass --samples DIR or --data-dir DIR)")
    return random_samples(pre, n, seed)
