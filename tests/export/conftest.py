"""Fixtures for the export tests: a small CNN trained for real on scikit-learn's digits.

Trained with a plain loop (seconds on 2 cores) so these tests do not depend on the training CLI;
the checkpoint follows docs/FORMATS.md and records ``dataset: digits`` so export takes its parity
and calibration samples from the real data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import save_checkpoint
from training.datasets import get_dataset
from training.models import build_model
from training.transforms import make_preprocess

DIGITS_SIZE = 8


def _tensors(ds, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(ds.images.astype(np.float32) / 255.0).unsqueeze(1)   # (N, 1, 8, 8)
    return (x - mean) / std, torch.from_numpy(ds.labels)


def train_digits_checkpoint(path: Path, arch: str = "simple_cnn", epochs: int = 8, seed: int = 0) -> Path:
    """Train ``arch`` on digits (train split) and save a contract checkpoint; returns ``path``."""
    torch.manual_seed(seed)
    splits = get_dataset("digits", seed=seed)
    pre = make_preprocess(channels=1, input_size=DIGITS_SIZE, mean=splits.mean, std=splits.std)
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": DIGITS_SIZE, "head": [], "dropout": 0.0}
    model = build_model(arch, **kwargs)
    xtr, ytr = _tensors(splits.train, pre["mean"][0], pre["std"][0])
    xte, yte = _tensors(splits.test, pre["mean"][0], pre["std"][0])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    save_checkpoint(path, {
        "model": {"name": arch, "kwargs": kwargs}, "num_classes": 10, "in_channels": 1, "input_size": DIGITS_SIZE,
        "preprocess": pre, "class_names": splits.class_names, "dataset": splits.info,
        "state_dict": model.state_dict(), "epoch": epochs, "best_val_acc": acc,
        "metrics": {"test_acc": acc}, "config": {"model": arch, "dataset": "digits", "epochs": epochs},
    })
    return path


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> Path:
    """simple_cnn trained on digits (about 97 % test accuracy)."""
    return train_digits_checkpoint(tmp_path_factory.mktemp("ckpt") / "digits_cnn" / "best.pt")
