"""`make image DATA=folder` (scripts/serve.sh image): a tiny real folder of labelled images is trained
on, exported behind the parity gate and baked into an image under its own model name, with no
renaming by hand; the printed `podman run` line names that image, and the image serves the folder's
model (its name and classes in /models, an answer for one of its files)."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from ctr_run import READ_ONLY, classify, start_container

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from test_serve_script import CLASSES, script_env, write_folder  # noqa: E402  (the folder `make serve` is tested on)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_make_image_from_a_folder(engine, tmp_path: Path) -> None:
    data = tmp_path / f"Folder{uuid.uuid4().hex[:6]}"  # unique: the image is named after it
    files = write_folder(data)
    env = {**os.environ, **script_env(tmp_path, data, EPOCHS="3"), "BENTOML_DO_NOT_TRACK": "true"}
    p = subprocess.run([str(ROOT / "scripts" / "serve.sh"), "image"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    name = f"{data.name.lower()}-simple_cnn"
    run = [ln for ln in p.stdout.splitlines() if ln.startswith("[image] run: ")]
    assert run and run[0].endswith(f" imgserve-{name}:cpu"), p.stdout[-2000:]
    assert "--read-only --tmpfs /tmp" in run[0] and "127.0.0.1:3000:3000" in run[0], run
    image = run[0].rsplit(" ", 1)[1]
    try:
        box = start_container(engine, image, args=READ_ONLY)
        try:
            (m,) = httpx.get(box.url + "/models", timeout=10).json()["models"]
            assert m["name"] == name and m["class_names"] == sorted(CLASSES), m
            f = files["seven"][-1]
            r = classify(box.url, (f.name, f.read_bytes(), "image/png"))
            assert r.status_code == 200 and r.json()["model"] == name, r.text
        finally:
            box.remove()
    finally:
        for tag in (image, *(ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("[image] imgserve-"))):
            engine.run("rmi", tag, check=False)
