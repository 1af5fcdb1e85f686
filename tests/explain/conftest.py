"""An explainable model for the /explain tests: gap_cnn (convs, global average pool, linear)
trained for real on scikit-learn's digits and exported through both gates (logits and CAM)."""
from __future__ import annotations

from pathlib import Path

import pytest

GAP_RUN_FLAGS = dict(model="gap_cnn", dataset="digits", epochs=8, batch_size=32, optimizer="adam", lr=3e-3,
                     scheduler="cosine", augment=False, seed=0, device="cpu", threads=1, progress=False)


@pytest.fixture(scope="session")
def gap_digits_run(tmp_path_factory) -> Path:
    from training.train import TrainConfig, train

    return train(TrainConfig(**GAP_RUN_FLAGS, out=str(tmp_path_factory.mktemp("runs") / "digits_gap")))


@pytest.fixture(scope="session")
def gap_digits_bundle(gap_digits_run, tmp_path_factory) -> Path:
    from export import export_bundle

    return export_bundle(gap_digits_run / "best.pt", tmp_path_factory.mktemp("bundle") / "gap", name="gap", version="1",
                         samples=32)
