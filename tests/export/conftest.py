"""Fixtures for the export tests, built on the shared ``trained_digits_run`` (tests/conftest.py):
a simple_cnn trained for real on scikit-learn's digits by the training stage's own ``train()``.
Its checkpoint records ``dataset: digits``, so export takes parity and calibration samples from
the real data."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_checkpoint(trained_digits_run) -> Path:
    """best.pt of the shared digits run (well above 90 % test accuracy)."""
    return Path(trained_digits_run) / "best.pt"
