"""Datasets registry (same pattern as the models registry): a name maps to a small loader.

``get_dataset(name, ...)`` returns a :class:`DataSplits` whose ``train``/``val``/``test`` yield
``(PIL.Image, int)`` *untransformed*, so training applies its own transforms and export can take
raw samples for its parity checks. Loading is cheap (idx files are decoded once and cached) and
imports nothing heavy beyond numpy/PIL, so export may call it too.

Splits are deterministic: validation is a seeded, stratified slice of the training data for
datasets that ship only train/test; datasets with a single pool are split 70/15/15 the same way.
"""
from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from imgformat.preprocess import to_color_mode
from imgformat.registry import Registry

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1                      # val slice of an official train split
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)    # train/val/test of a single pool (seeds/001)
STATS_SAMPLE = 5000                     # images used to estimate mean/std
FOLDER_STATS_SAMPLE = 300               # fewer for folders: each is a file decode
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# MNIST's 10k test set ships with the repository (data/mnist, CC BY-SA 3.0), so every clone has real MNIST.
MNIST_DIR = Path(__file__).resolve().parents[1] / "data" / "mnist"
CACHE_DIR = Path(os.environ.get("IMGSERVE_DATA", Path.home() / ".cache" / "imgserve"))


class DatasetError(ValueError):
    """Data that cannot be loaded; the message says how to get it (package, flag or path)."""


class UnknownDatasetError(DatasetError):
    """A dataset name that is not registered; the message lists the valid ones."""


# --------------------------------------------------------------------------------------------
# Dataset classes: raw PIL images and int labels
# --------------------------------------------------------------------------------------------
class ArrayImageDataset(Dataset):
    """Images held in a uint8 array, (N, H, W) grayscale or (N, H, W, 3) RGB."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        assert len(images) == len(labels), "images and labels differ in length"
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.labels[i])

    def subset(self, idx: np.ndarray) -> "ArrayImageDataset":
        return ArrayImageDataset(self.images[idx], self.labels[idx])


class FileImageDataset(Dataset):
    """Image files on disk. A file that fails to decode is logged by path and replaced by the next
    readable one, so a bad file found mid-run never stops training (most are caught at scan time).

    ``decode`` (file bytes -> PIL image) is the serving pipeline's once training knows its
    preprocessing (``use_pipeline``): EXIF orientation, 16-bit, alpha and the reduced-scale JPEG
    decode then happen here exactly as in the service. Until then files are opened and loaded as is."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int],
                 decode: Callable[[bytes], Image.Image] | None = None):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.decode = decode
        self.bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            try:
                return self._load(self.paths[j]), int(self.labels[j])
            except Exception as e:  # PIL raises many types for broken files
                if self.paths[j] not in self.bad:
                    self.bad.add(self.paths[j])
                    log.warning("skipping unreadable image %s (%s)", self.paths[j], e)
        raise DatasetError("no readable image left in the dataset")

    def _load(self, path: str) -> Image.Image:
        if self.decode is not None:
            return self.decode(Path(path).read_bytes())
        with Image.open(path) as im:
            im.load()
            return im.copy()

    def subset(self, idx: np.ndarray) -> "FileImageDataset":
        return FileImageDataset([self.paths[i] for i in idx], self.labels[idx], self.decode)


@dataclass
class DataSplits:
    """Train/val/test splits plus everything preprocessing and the checkpoint need."""

    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    channels: int                     # 1 (grayscale) or 3 (RGB) as stored
    native_size: int                  # square side the images come at (folder: typical shorter side)
    mean: list[float]                 # per channel of ``channels``, pixels scaled to [0, 1]
    std: list[float]
    info: dict[str, Any] = field(default_factory=dict)   # stored as the checkpoint's ``dataset``
    hflip: bool = False               # horizontal flips are a label-preserving augmentation
    photos: bool = False              # variable-size photos: shorter_side_center_crop at >= 64 px

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def stats_for(self, channels: int) -> tuple[list[float], list[float]]:
        """mean/std for ``channels`` (gray -> RGB replicates; RGB -> gray uses ITU-R 601 luma, like PIL)."""
        if channels == self.channels:
            return list(self.mean), list(self.std)
        if channels == 3:
            return self.mean * 3, self.std * 3
        w = (0.299, 0.587, 0.114)
        return [sum(a * b for a, b in zip(w, self.mean))], [sum(a * b for a, b in zip(w, self.std))]


def use_pipeline(splits: DataSplits, decode: Callable[[bytes], Image.Image]) -> DataSplits:
    """Decode the image files of every split with ``decode`` (``Preprocessor.decode_bytes``), the
    service's own decoding; in-memory datasets are decoded by the transforms. Returns ``splits``."""
    for ds in (splits.train, splits.val, splits.test):
        if isinstance(ds, FileImageDataset):
            ds.decode = decode
    return splits


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
Loader = Callable[..., DataSplits]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Loader
    description: str


_DATASETS: Registry[DatasetSpec] = Registry("dataset")
list_datasets = _DATASETS.names


def register_dataset(name: str, *, description: str):
    """Decorator: register ``loader(data_dir, download, seed) -> DataSplits`` under ``name``."""

    def wrap(loader: Loader) -> Loader:
        _DATASETS.add(name, DatasetSpec(name, loader, description))
        return loader

    return wrap


def get_dataset_spec(name: str) -> DatasetSpec:
    return _DATASETS.get(name, UnknownDatasetError)


def get_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                seed: int = 0, limit: int | None = None) -> DataSplits:
    """Load a registered dataset's splits. ``limit`` caps each split (stratified, seeded) for tests."""
    spec = get_dataset_spec(name)
    splits = spec.loader(data_dir=None if data_dir is None else Path(data_dir), download=download, seed=seed)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"limit must be >= 1, got {limit}")
        splits.train, splits.val, splits.test = (_limit(ds, limit, seed) for ds in (splits.train, splits.val, splits.test))
    splits.info = {"name": name, "data_dir": None if data_dir is None else str(data_dir), "seed": seed,
                   "limit": limit, **splits.info,
                   "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}}
    return splits


def get_dataset_from_info(info: dict[str, Any]) -> DataSplits:
    """Reload the data a checkpoint was trained on from its ``dataset`` dict (export's parity samples)."""
    return get_dataset(info["name"], data_dir=info.get("data_dir"), seed=info.get("seed", 0), limit=info.get("limit"))


# --------------------------------------------------------------------------------------------
# Split helpers
# --------------------------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of each part; every class is split in the given proportions (seeded, deterministic)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    cuts = np.cumsum(fractions)[:-1] / sum(fractions)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        for part, chunk in zip(parts, np.split(idx, np.round(cuts * len(idx)).astype(int))):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def stratified_take(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Exactly ``min(n, len)`` indices with class proportions kept (seeded)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    key = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        key[idx] = (np.arange(len(idx)) + 0.5) / len(idx)   # rank within class, as a fraction
    return np.sort(np.argsort(key, kind="stable")[:n])


def _limit(ds: Dataset, n: int, seed: int) -> Dataset:
    return ds.subset(stratified_take(ds.labels, n, seed)) if len(ds) > n else ds


def _val_from_train(train: ArrayImageDataset | FileImageDataset, seed: int):
    tr, va = stratified_split(train.labels, (1 - VAL_FRACTION, VAL_FRACTION), seed)
    return train.subset(tr), train.subset(va)


def _three_way(pool: ArrayImageDataset | FileImageDataset, seed: int):
    return tuple(pool.subset(i) for i in stratified_split(pool.labels, SPLIT_FRACTIONS, seed))


def _array_stats(images: np.ndarray, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixels in [0, 1] over a seeded sample of images."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), size=min(STATS_SAMPLE, len(images)), replace=False)
    x = images[np.sort(idx)].astype(np.float32) / 255.0
    x = x.reshape(-1, 1) if x.ndim == 3 else x.reshape(-1, x.shape[-1])
    return [round(float(v), 4) for v in x.mean(0)], [round(float(v), 4) for v in x.std(0)]


def _array_splits(train: ArrayImageDataset, val: ArrayImageDataset, test: ArrayImageDataset,
                  class_names: list[str], seed: int, split: str, hflip: bool) -> DataSplits:
    mean, std = _array_stats(train.images, seed)
    channels = 1 if train.images.ndim == 3 else train.images.shape[-1]
    return DataSplits(train, val, test, class_names, channels, int(train.images.shape[1]), mean, std,
                      info={"split": split}, hflip=hflip)


# --------------------------------------------------------------------------------------------
# idx files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _read_idx(path: str) -> np.ndarray:
    """Decode an idx file (gzipped or not): images -> (N, H, W) uint8, labels -> (N,) uint8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise DatasetError(f"{path} is not a uint8 idx file (magic {magic:#x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _idx_pair(data_dir: Path, prefix: str) -> ArrayImageDataset | None:
    images = _find_idx(data_dir, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(data_dir, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    return ArrayImageDataset(_read_idx(str(images)), _read_idx(str(labels)))


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@register_dataset("fashion-mnist", description="Fashion-MNIST 60k+10k 28x28 gray (apt: dataset-fashion-mnist)")
def _fashion_mnist(data_dir: Path | None, download: bool, seed: int) -> DataSplits:
    data_dir = data_dir or Path(FASHION_MNIST_DIR)
    train, test = _idx_pair(data_dir, "train"), _idx_pair(data_dir, "t10k")
    if train is None or test is None:
        raise DatasetError(
            f"Fashion-MNIST idx files not found in {data_dir}: install them with "
            f"`sudo apt-get install dataset-fashion-mnist` (puts them in {FASHION_MNIST_DIR}) "
            f"or pass --data-dir DIR holding train-/t10k-images-idx3-ubyte.gz and -labels-idx1-ubyte.gz")
    train, val = _val_from_train(train, seed)
    # Flips suit clothes (left/right symmetric classes), as in the usual Fashion-MNIST recipes.
    return _array_splits(train, val, test, FASHION_CLASSES, seed,
                         f"official train/test; val = seeded stratified {VAL_FRACTION:.0%} of train", hflip=True)


@register_dataset("mnist", description="MNIST idx files (default: the repo's data/mnist 10k test set, split "
                                       "70/15/15; --data-dir for others, train+t10k or one set)")
def _mnist(data_dir: Path | None, download: bool, seed: int) -> DataSplits:
    hint = ("pass --data-dir DIR holding MNIST idx files: t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz (and optionally train-*)")
    data_dir = data_dir or MNIST_DIR
    train, test = _idx_pair(data_dir, "train"), _idx_pair(data_dir, "t10k")
    classes = [str(d) for d in range(10)]
    if train is not None and test is not None:
        train, val = _val_from_train(train, seed)
        split = f"official train/test; val = seeded stratified {VAL_FRACTION:.0%} of train"
    elif test is not None or train is not None:
        # Only one set present (e.g. the 10k test set): split it deterministically 70/15/15.
        train, val, test = _three_way(test if test is not None else train, seed)
        split = "single idx set split seeded stratified 70/15/15"
    else:
        raise DatasetError(f"no MNIST idx files in {data_dir}: {hint}")
    return _array_splits(train, val, test, classes, seed, split, hflip=False)  # flips change digits


# --------------------------------------------------------------------------------------------
# CIFAR (torchvision) and scikit-learn digits
# --------------------------------------------------------------------------------------------
def _cifar(cls_name: str, folder: str, data_dir: Path | None, download: bool, seed: int) -> DataSplits:
    import torchvision  # imported here: only CIFAR needs it

    root = data_dir or CACHE_DIR / cls_name.lower()
    cls = getattr(torchvision.datasets, cls_name)
    if not download and not (root / folder).is_dir():
        raise DatasetError(f"{cls_name} not found under {root} (expected {root / folder}): run again with "
                           f"--download (needs the internet) or pass --data-dir DIR that holds {folder}/")
    try:
        train_tv = cls(str(root), train=True, download=download)
        test_tv = cls(str(root), train=False, download=download)
    except Exception as e:
        raise DatasetError(f"could not load {cls_name} from {root} ({str(e).splitlines()[0]}): "
                           f"use --download with internet access or --data-dir DIR holding {folder}/") from None
    train = ArrayImageDataset(np.asarray(train_tv.data), np.asarray(train_tv.targets))
    test = ArrayImageDataset(np.asarray(test_tv.data), np.asarray(test_tv.targets))
    train, val = _val_from_train(train, seed)
    splits = _array_splits(train, val, test, list(train_tv.classes), seed,
                           f"official train/test; val = seeded stratified {VAL_FRACTION:.0%} of train", hflip=True)
    splits.info["data_dir"] = str(root)
    return splits


@register_dataset("cifar10", description="CIFAR-10 via torchvision (--download or --data-dir)")
def _cifar10(data_dir: Path | None, download: bool, seed: int) -> DataSplits:
    return _cifar("CIFAR10", "cifar-10-batches-py", data_dir, download, seed)


@register_dataset("cifar100", description="CIFAR-100 via torchvision (--download or --data-dir)")
def _cifar100(data_dir: Path | None, download: bool, seed: int) -> DataSplits:
    return _cifar("CIFAR100", "cifar-100-python", data_dir, download, seed)


@register_dataset("digits", description="scikit-learn's bundled 8x8 digits (1797 images, always available)")
def _digits(data_dir: Path | None, download: bool, seed: int) -> DataSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)   # 0..16 -> 0..255, (N, 8, 8)
    train, val, test = _three_way(ArrayImageDataset(images, d.target), seed)
    return _array_splits(train, val, test, [str(c) for c in d.target_names], seed,
                         "bundled pool split seeded stratified 70/15/15", hflip=False)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------
def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()  # reads the file's structure without decoding all pixels
        return True
    except Exception as e:
        log.warning("skipping unreadable image %s (%s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False


def _scan_folder(root: Path, class_names: list[str] | None = None) -> tuple[FileImageDataset, list[str], list[str]]:
    """ImageFolder layout root/CLASS/*.png -> dataset, class names, skipped paths."""
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_names = class_names or found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DatasetError(f"{root} has class folders {unknown} that the train split lacks")
    paths, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        cdir = root / name
        files = sorted(p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) \
            if cdir.is_dir() else []
        for p in files:
            if _readable(p):
                paths.append(p)
                labels.append(label)
            else:
                skipped.append(str(p))
    return FileImageDataset(paths, labels), class_names, skipped


def _folder_stats(ds: FileImageDataset, seed: int) -> tuple[int, int, list[float], list[float]]:
    """channels, typical shorter side and mean/std from a seeded sample of the files."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ds), size=min(FOLDER_STATS_SAMPLE, len(ds)), replace=False))
    images = [ds[i][0] for i in idx]
    gray = all(im.mode in ("L", "1", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F") for im in images)
    mode, channels = ("L", 1) if gray else ("RGB", 3)
    sides = sorted(min(im.size) for im in images)
    # the pipeline's colour conversion (16-bit by range, alpha on black): the statistics of the pixels the model sees
    pixels = np.concatenate([np.asarray(to_color_mode(im, mode), dtype=np.float32).reshape(-1, channels) / 255.0
                             for im in images])
    mean = [round(float(v), 4) for v in pixels.mean(0)]
    std = [round(max(float(v), 1e-3), 4) for v in pixels.std(0)]
    return channels, int(sides[len(sides) // 2]), mean, std


@register_dataset("folder", description="ImageFolder tree at --data-dir (train/val/test subfolders, else 70/15/15)")
def _folder(data_dir: Path | None, download: bool, seed: int) -> DataSplits:
    if data_dir is None or not data_dir.is_dir():
        raise DatasetError(f"folder dataset needs --data-dir DIR with one subfolder per class (got {data_dir})")
    skipped: list[str] = []
    if (data_dir / "train").is_dir():
        train, classes, sk = _scan_folder(data_dir / "train")
        skipped += sk
        parts = {}
        for part in ("val", "test"):
            if (data_dir / part).is_dir():
                parts[part], _, sk = _scan_folder(data_dir / part, classes)
                skipped += sk
        if "val" not in parts:
            train, parts["val"] = _val_from_train(train, seed)
        if "test" not in parts:
            raise DatasetError(f"{data_dir} has train/ but no test/ subfolder: add one, or put the class "
                               f"folders directly in {data_dir} for a 70/15/15 split")
        val, test = parts["val"], parts["test"]
        split = "train/val/test subfolders" + ("" if (data_dir / "val").is_dir() else "; val = seeded 10% of train")
    else:
        pool, classes, skipped = _scan_folder(data_dir)
        train, val, test = _three_way(pool, seed)
        split = "class folders split seeded stratified 70/15/15"
    if len(classes) < 2 or len(train) == 0:
        raise DatasetError(f"{data_dir} needs at least 2 class subfolders with readable images")
    channels, side, mean, std = _folder_stats(train, seed)
    return DataSplits(train, val, test, classes, channels, side, mean, std,
                      info={"split": split, "skipped": skipped}, hflip=False, photos=True)
