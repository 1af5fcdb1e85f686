"""Fixtures for the scale-out tests: two versions of the digits bundle, the image, replicas behind HAProxy.

Replicas are containers of the project's image (the podman runner). IMGSERVE_REPLICA_RUNNER=process
runs the same tests against plain `bentoml serve` processes, for a host without a container engine.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from loadtests.soak import Result, closed_loop, split_url

ROOT = Path(__file__).resolve().parents[2]
RUNNER = os.environ.get("IMGSERVE_REPLICA_RUNNER", "podman")
IMAGE_NAME = "imgserve-replicas"


@pytest.fixture(scope="session")
def digits_versions(trained_digits_run, tmp_path_factory) -> dict[str, Path]:
    """The digits CNN exported twice, as versions v1 and v2 of the model `digits` (same weights, so a
    correct answer is the same label whichever version gives it)."""
    from export import export_bundle

    out = tmp_path_factory.mktemp("digits-versions")
    return {v: export_bundle(trained_digits_run / "best.pt", out / f"digits-{v}", name="digits", version=v, samples=32)
            for v in ("v1", "v2")}


@pytest.fixture(scope="session")
def replica_image(digits_versions, tmp_path_factory) -> str:
    """The project's CPU image built from this checkout (`python -m container build`, as `make image`),
    with the digits model baked in as `default`; the replicas serve mounted bundles on top of it.
    Cached layers make this about half a minute."""
    if RUNNER != "podman":
        yield ""  # a generator fixture: `return ""` here would be "did not yield a value"
        return
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/setup.sh installs it (or IMGSERVE_REPLICA_RUNNER=process)")
    tmp = tmp_path_factory.mktemp("replica-image")
    baked = tmp / "default"
    shutil.copytree(digits_versions["v1"], baked)
    manifest = json.loads((baked / "manifest.json").read_text())
    (baked / "manifest.json").write_text(json.dumps({**manifest, "name": "default"}))
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "container", "build", "--flavour", "cpu", "--engine", "podman",
                          "--bundle", str(baked), "--name", IMAGE_NAME, "--report", str(tmp / "image.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"image build failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    image = json.loads((tmp / "image.json").read_text())["image"]
    yield image
    from deploy.replicas.runners import podman

    podman().run("rmi", image, check=False)  # the NAME:cpu alias stays: it keeps the layers cached


@contextmanager
def background_load(url: str, make, clients: int = 8, max_s: float = 600.0):
    """A closed loop of ``clients`` running until the block ends; yields the list it fills."""
    host, port = split_url(url)
    results: list[Result] = []
    stop = threading.Event()
    t = threading.Thread(target=lambda: results.extend(asyncio.run(
        closed_loop(host, port, make, clients, max_s, max_requests=1_000_000, timeout=60.0, stop=stop.is_set))))
    t.start()
    try:
        time.sleep(1.0)
        yield results
    finally:
        stop.set()
        t.join(120)
