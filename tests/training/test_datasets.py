"""Datasets registry: every dataset loads or fails with a message naming the fix; splits are
deterministic and stratified; image folders report and skip unreadable files."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.datasets import (DatasetError, UnknownDatasetError, get_dataset, list_datasets,
                               stratified_split, stratified_take)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _available(name: str) -> tuple[dict, str | None]:
    """kwargs to load ``name`` here, or a skip reason."""
    if name == "digits":
        return {}, None
    if name == "fashion-mnist":
        return {}, None if (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists() else "apt dataset-fashion-mnist absent"
    if name == "mnist":
        return {}, None   # the repo's data/mnist (MNIST's 10k test set) is the default
    return {}, f"{name} needs files or the internet"


@pytest.mark.parametrize("name", [n for n in list_datasets() if n != "folder"])
def test_dataset_contract(name):
    kwargs, skip = _available(name)
    if skip:
        pytest.skip(skip)
    s = get_dataset(name, limit=200, **kwargs)
    assert s.channels in (1, 3) and len(s.mean) == len(s.std) == s.channels
    assert all(0 < v < 1 for v in s.mean + s.std), f"mean/std out of range: {s.mean} {s.std}"
    assert s.num_classes == 10 and len(s.class_names) == 10
    for split in (s.train, s.val, s.test):
        assert 0 < len(split) <= 200
        img, label = split[0]
        assert isinstance(img, Image.Image) and img.size == (s.native_size, s.native_size), "raw PIL image expected"
        assert isinstance(label, int) and 0 <= label < 10
    assert s.info["name"] == name and s.info["sizes"]["train"] == len(s.train)


@pytest.mark.parametrize("name,kwargs,needle", [
    ("cifar10", {"data_dir": "MISSING"}, "--download"),
    ("cifar100", {"data_dir": "MISSING"}, "--download"),
    ("fashion-mnist", {"data_dir": "MISSING"}, "apt-get install dataset-fashion-mnist"),
    ("mnist", {"data_dir": "MISSING"}, "--data-dir"),
    ("folder", {"data_dir": "MISSING"}, "--data-dir"),
])
def test_missing_data_names_the_fix(tmp_path, name, kwargs, needle):
    kwargs = {k: (tmp_path / "nothing-here" if v == "MISSING" else v) for k, v in kwargs.items()}
    with pytest.raises(DatasetError) as e:
        get_dataset(name, **kwargs)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, f"message should be one line naming {needle!r}: {msg}"


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownDatasetError, match="valid datasets: .*digits.*fashion-mnist"):
        get_dataset("imagenet-21k")


def test_digits_splits_disjoint_deterministic_stratified():
    a, b = get_dataset("digits", seed=3), get_dataset("digits", seed=3)
    assert np.array_equal(a.test.images, b.test.images) and np.array_equal(a.train.labels, b.train.labels)
    c = get_dataset("digits", seed=4)
    assert not np.array_equal(a.test.images, c.test.images), "another seed should give another split"
    sizes = [len(a.train), len(a.val), len(a.test)]
    assert sum(sizes) == 1797 and abs(sizes[0] / 1797 - 0.70) < 0.01
    # disjoint: no image appears in two splits (digits has a few exact duplicates, so compare indices
    # through a fresh split of the labels)
    parts = stratified_split(np.arange(1797) % 10, (0.7, 0.15, 0.15), seed=3)
    assert sum(len(p) for p in parts) == 1797 and len(set(np.concatenate(parts))) == 1797
    for split in (a.train, a.val, a.test):
        share = np.bincount(split.labels, minlength=10) / len(split)
        assert np.all(np.abs(share - 0.1) < 0.02), f"class shares not stratified: {share}"


def test_stratified_take_keeps_proportions():
    labels = np.array([0] * 80 + [1] * 20)
    idx = stratified_take(labels, 10, seed=0)
    assert len(idx) == 10 and np.bincount(labels[idx]).tolist() == [8, 2]
    assert np.array_equal(idx, stratified_take(labels, 10, seed=0))


# ---------------------------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------------------------
CLASSES = ("zero", "one", "two")
PER_CLASS = 20


def _write_digits_folder(root: Path, per_class: int = PER_CLASS) -> Path:
    """root/CLASS/NNN.png from real sklearn digits (upscaled to 16x16), plus one corrupt file."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        imgs = d.images[d.target == label][:per_class]
        for i, im in enumerate(imgs):
            Image.fromarray(np.uint8(im * 255 / 16)).resize((16, 16)).save(root / name / f"{i:03d}.png")
    return root


def test_folder_split_deterministic_stratified_and_skips_corrupt(tmp_path, caplog):
    root = _write_digits_folder(tmp_path / "digits_folder")
    corrupt = root / "one" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "two" / "notes.txt").write_text("not an image extension: ignored")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        a = get_dataset("folder", data_dir=root, seed=1)
    assert str(corrupt) in caplog.text, "the unreadable file must be reported by path"
    assert a.info["skipped"] == [str(corrupt)]
    b = get_dataset("folder", data_dir=root, seed=1)
    assert a.class_names == sorted(CLASSES)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert x.paths == y.paths, "same seed must give the same split"
    all_paths = a.train.paths + a.val.paths + a.test.paths
    assert len(all_paths) == len(set(all_paths)) == 3 * PER_CLASS and str(corrupt) not in all_paths
    for split, expected in ((a.train, 14), (a.val, 3), (a.test, 3)):   # 70/15/15 of 20 per class
        assert np.bincount(split.labels).tolist() == [expected] * 3, "split not stratified"
    assert a.channels == 1 and a.native_size == 16 and a.photos
    img, label = a.test[0]
    assert isinstance(img, Image.Image) and img.size == (16, 16)


def test_folder_with_train_test_subfolders(tmp_path):
    _write_digits_folder(tmp_path / "train", per_class=10)
    _write_digits_folder(tmp_path / "test", per_class=4)
    s = get_dataset("folder", data_dir=tmp_path, seed=0)
    assert len(s.test) == 12 and len(s.train) + len(s.val) == 30
    assert "val = seeded" in s.info["split"]


def test_file_dataset_survives_a_file_broken_after_the_scan(tmp_path, caplog):
    root = _write_digits_folder(tmp_path / "f", per_class=5)
    s = get_dataset("folder", data_dir=root, seed=0)
    victim = Path(s.train.paths[0])
    victim.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        img, _ = s.train[0]
    assert isinstance(img, Image.Image) and str(victim) in caplog.text
