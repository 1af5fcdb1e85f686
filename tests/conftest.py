"""Shared fixtures. ``trained_digits_run``: a real training run on scikit-learn's digits through
``training.train.train`` (the CLI's function), reusable by the export and service tests."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A small CNN on digits: about 15 s on a busy 2-core machine and well above 90 % test accuracy.
DIGITS_RUN_FLAGS = dict(model="simple_cnn", dataset="digits", epochs=12, batch_size=32, optimizer="adam",
                        lr=3e-3, scheduler="cosine", augment=False, seed=0, device="cpu", threads=1, progress=False)


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.gpu_image`` tests run only when asked for (``-m gpu_image``).
    ``@pytest.mark.gpu`` tests run wherever a CUDA device is visible (the driver's count, not
    whether this torch build has CUDA) and are skipped, saying so, only where none is."""
    if "gpu_image" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="builds the 3.6 GB GPU image (~8 min cold): run with -m gpu_image")
        for item in items:
            if item.get_closest_marker("gpu_image"):
                item.add_marker(skip)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    from service.backends import cuda_device_count

    if cuda_device_count() == 0:
        skip = pytest.mark.skip(reason="needs a CUDA device; none is visible on this host")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_run_flags() -> dict:
    """The TrainConfig fields ``trained_digits_run`` was trained with (tests cannot import conftest)."""
    return dict(DIGITS_RUN_FLAGS)


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory) -> Path:
    """Run directory of a finished digits run: best.pt, last.pt, metrics.json, config.json, PNGs."""
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "digits_simple_cnn"
    return train(TrainConfig(**DIGITS_RUN_FLAGS, out=str(out)))


@pytest.fixture(scope="session")
def digits_bundle(trained_digits_run, tmp_path_factory) -> Path:
    """``trained_digits_run`` exported by ``export.export_bundle`` with its parity gate: FP32 and INT8
    (the INT8 gate passed), named "digits", version "1". Served by the service, reliability and demo tests."""
    from export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "digits"
    return export_bundle(trained_digits_run / "best.pt", out, name="digits", version="1", samples=32, int8=True,
                         calib_samples=64, int8_eval_samples=200)
