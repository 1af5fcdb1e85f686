"""The CPU image built from the bento (``python -m container build``, as `make image` does) with the
digits bundle baked in (containers: ctr_run.py). The image is built once per session; the base image and the
dependency layers are reused from earlier builds, so a rebuild takes about half a minute.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from container.build import WORK
from container.engines import Engine, get_engine

ROOT = Path(__file__).resolve().parents[2]
IMAGE_NAME = "imgserve-test"


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        return get_engine("auto", WORK)
    except SystemExit as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build and run the image: {e} (scripts/setup.sh installs podman)")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def default_bundle(digits_bundle, tmp_path_factory) -> Path:
    """The digits bundle named `default`, the model the bentofile bakes in (only manifest.json changes:
    the model files and their hashes stay the same)."""
    dst = tmp_path_factory.mktemp("ctr-bundle") / "default"
    shutil.copytree(digits_bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["name"] = "default"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="session")
def cpu_image(engine, default_bundle, tmp_path_factory) -> dict:
    """`python -m container build --flavour cpu` in a private BENTOML_HOME; returns its report."""
    tmp = tmp_path_factory.mktemp("ctr-build")
    report = tmp / "image.json"
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "true"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "container", "build", "--flavour", "cpu", "--engine", engine.name,
                          "--bundle", str(default_bundle), "--name", IMAGE_NAME, "--report", str(report)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"image build failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    built = json.loads(report.read_text())
    print(f"\nbuilt {built['image']} in {time.perf_counter() - t0:.0f} s: {built['size_bytes'] / 1e6:.0f} MB, "
          f"base {built['base']}")
    yield built
    engine.run("rmi", built["image"], check=False)  # the FLAVOUR alias stays: it keeps the layers cached
