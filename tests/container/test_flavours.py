"""The GPU flavour's bento, generated from bentofile.yaml (no engine needed; test_gpu_image_build.py
builds and checks the image here, test_gpu_image.py runs it on a GPU host)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from container.build import BENTOFILE, ROOT, WORK, served_model
from container.flavours import flavour_bentofile, get_flavour, list_flavours

BENTOML = Path(sys.executable).with_name("bentoml")


def test_flavours_change_only_what_they_declare() -> None:
    assert list_flavours() == ["cpu", "gpu"]
    assert flavour_bentofile(get_flavour("cpu"), BENTOFILE, WORK) == BENTOFILE
    src = yaml.safe_load(BENTOFILE.read_text())
    gpu = yaml.safe_load(flavour_bentofile(get_flavour("gpu"), BENTOFILE, WORK).read_text())
    assert gpu["include"] == src["include"] and gpu["models"] == src["models"]
    added = {e["name"]: e["value"] for e in gpu["envs"][len(src["envs"]):]}
    assert gpu["envs"][:len(src["envs"])] == src["envs"] and set(added) == {"NVIDIA_DRIVER_CAPABILITIES", "LD_LIBRARY_PATH"}
    assert "/app/.venv/lib/python3.11/site-packages/nvidia/cudnn/lib" in added["LD_LIBRARY_PATH"].split(":")
    swapped = [p for p in gpu["python"]["packages"] if p not in src["python"]["packages"]]
    assert swapped == ["onnxruntime-gpu[cuda,cudnn]==1.26.0"], swapped
    assert gpu["docker"] == src["docker"], "CUDA comes from wheels: the GPU image has the CPU image's base"
    assert served_model(BENTOFILE) == "default"


def test_gpu_bento_dockerfile(default_bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-c", "from imgformat.store import import_to_bentoml; "
                    f"import_to_bentoml({str(default_bundle)!r})"], cwd=ROOT, env=env, check=True, timeout=120)
    bentofile = flavour_bentofile(get_flavour("gpu"), BENTOFILE, WORK)
    out = subprocess.run([str(BENTOML), "build", "-f", str(bentofile.relative_to(ROOT)), "-o", "tag", "."], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    name, version = out.stdout.strip().splitlines()[-1].replace("__tag__:", "").split(":")
    bento = tmp_path / "home" / "bentos" / name / version
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    # The CPU flavour's base; CUDA 12 and cuDNN 9 are locked as PyPI wheels.
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile, dockerfile[:800]
    assert "--python 3.11" in dockerfile and "HEALTHCHECK" in dockerfile and "USER bentoml" in dockerfile
    assert "NVIDIA_DRIVER_CAPABILITIES" in dockerfile
    reqs = (bento / "env" / "python" / "requirements.txt").read_text().split()
    assert "onnxruntime-gpu[cuda,cudnn]==1.26.0" in reqs and not any(r.startswith("onnxruntime==") for r in reqs), reqs
    lock = (bento / "env" / "python" / "requirements.lock.txt").read_text()
    for pin in ("onnxruntime-gpu==1.26.0", "nvidia-cudnn-cu12==9.", "nvidia-cublas-cu12==12.", "nvidia-cuda-runtime-cu12==12."):
        assert pin in lock, f"{pin} is not in the lock"
    assert "torch" not in lock
