"""The serving stack in this venv is the image's: every package pinned in bentofile.yaml (the lock the
image installs; scripts/setup.sh constrains the venv to it) has that version here. onnxruntime is the
exception: the venv has onnxruntime-gpu, checked at the same version."""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PATCHED = {"bentoml", "uvicorn", "starlette", "httptools"}  # what service/onewrite.py, route.py, metrics_labels.py rely on


def bentofile_pins() -> dict[str, str]:
    packages = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    return dict(p.split("==", 1) for p in packages)


def test_the_patched_packages_are_pinned_exactly() -> None:
    assert PATCHED <= set(bentofile_pins())


def test_the_venv_has_the_image_versions() -> None:
    pins = bentofile_pins()
    wrong = {}
    for name, version in pins.items():
        dist = "onnxruntime-gpu" if name == "onnxruntime" else name
        try:
            have = md.version(dist)
        except md.PackageNotFoundError:
            have = None
        if have != version:
            wrong[name] = (version, have)
    assert not wrong, f"bentofile.yaml pin vs this venv: {wrong} (re-run scripts/setup.sh)"


def test_setup_constrains_to_the_same_pins() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "serving_pins.py")], capture_output=True, text=True,
                         check=True).stdout.split()
    want = [f"{n}=={v}" for n, v in bentofile_pins().items() if n != "onnxruntime"]
    assert out == want
