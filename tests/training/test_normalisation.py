"""Which mean/std a run stores: ImageNet's when fine-tuning ImageNet weights, the dataset's otherwise."""
from __future__ import annotations

import pytest

from imgformat.spec import IMAGENET_MEAN, IMAGENET_STD
from training.datasets import get_dataset
from training.train import resolve_preprocess


@pytest.fixture(scope="module")
def splits():
    return get_dataset("digits", seed=0)


def test_imagenet_pretrained_rgb_uses_imagenet_statistics(splits) -> None:
    pre = resolve_preprocess(splits, 3, 32, "imagenet")
    assert pre["mean"] == pytest.approx(IMAGENET_MEAN) and pre["std"] == pytest.approx(IMAGENET_STD)


def test_imagenet_pretrained_grey_uses_their_channel_average(splits) -> None:
    pre = resolve_preprocess(splits, 1, 32, "imagenet")
    assert pre["mean"] == pytest.approx([sum(IMAGENET_MEAN) / 3]) and pre["std"] == pytest.approx([sum(IMAGENET_STD) / 3])


@pytest.mark.parametrize("pretrained", [None, "runs/other/best.pt"])
def test_scratch_and_checkpoint_sources_use_the_dataset_statistics(splits, pretrained) -> None:
    pre = resolve_preprocess(splits, 1, 8, pretrained)
    mean, std = splits.stats_for(1)
    assert pre["mean"] == pytest.approx(mean) and pre["std"] == pytest.approx(std)
    assert pre["mean"] != pytest.approx([sum(IMAGENET_MEAN) / 3])
