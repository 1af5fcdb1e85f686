"""The CPU image built from the bento (``python -m container build``, as `make image` does) with the
digits bundle baked in (containers: ctr_run.py). The image is built once per session; the base image and the
dependency layers are reused from earlier builds, so a rebuild takes about half a minute.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from container.build import WORK
from container.engines import Engine, get_engine
from ctr_run import LIMITS, build_image_cli
from service.launcher import start_service


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
    built = build_image_cli(engine, "cpu", "auto", default_bundle, tmp_path_factory.mktemp("ctr-build"))
    yield built
    engine.run("rmi", built["image"], check=False)  # the FLAVOUR alias stays: it keeps the layers cached


@pytest.fixture(scope="session")
def process(default_bundle, digits_bundle, tmp_path_factory):
    """The same bundles served as a process (`bentoml serve`): `default` and `digits`."""
    tmp = tmp_path_factory.mktemp("ctr-process")
    srv = start_service({"IMGSERVE_MODELS": f"{default_bundle},digits={digits_bundle}", **LIMITS},
                        tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()
