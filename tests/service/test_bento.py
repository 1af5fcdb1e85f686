"""`bentoml build` with the repository's bentofile.yaml, in a temporary BENTOML_HOME.

Checks the bento's contents and the generated Dockerfile; tests/container builds and runs the image.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BENTOML = Path(sys.executable).with_name("bentoml")


def test_bento_build(bundle: Path, tmp_path: Path) -> None:
    # The bentofile serves the store's `default` model: import the test bundle under that name.
    src = tmp_path / "default"
    shutil.copytree(bundle, src)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["name"] = "default"  # manifest.json itself is not hashed; the model files are
    (src / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-c", f"from imgformat.store import import_to_bentoml; import_to_bentoml({str(src)!r})"],
                   cwd=ROOT, env=env, check=True, timeout=120)
    out = subprocess.run([str(BENTOML), "build", "-o", "tag"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].replace("__tag__:", "")
    name, version = tag.split(":")
    bento = tmp_path / "home" / "bentos" / name / version
    meta = yaml.safe_load((bento / "bento.yaml").read_text())

    assert meta["service"] == "service.service:ImgServe" and name == "imgserve"
    assert [m["tag"] for m in meta["models"]] == [f"default:{manifest['version']}"], meta["models"]
    assert {"name": "IMGSERVE_MODELS", "value": "store:default:latest"}.items() <= meta["envs"][0].items()
    routes = {r["route"] for r in meta["schema"]["routes"]}
    assert {"/classify", "/classify_batch"} <= routes, routes
    files = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    assert {"service/service.py", "service/pages.py", "service/static/demo.html", "service/static/demo.js",
            "imgformat/preprocess.py", "imgformat/bundle.py",
            "imgformat/schemas/manifest.schema.json", "imgformat/schemas/preprocess.schema.json"} <= files, files
    # serving needs service/ + imgformat/ only
    assert not any(f.startswith(("tests/", "training/", "export/", "runs/", "bundles/", ".venv/")) for f in files), files
    missing = {f"service/{p.name}" for p in (ROOT / "service").glob("*.py")} - files
    assert not missing, f"bentofile.yaml's include misses {sorted(missing)}: the image would fail to import them"

    reqs = (bento / "env" / "python" / "requirements.txt").read_text().split()
    for pin in ("bentoml==1.4.39", "pillow==", "numpy==", "onnxruntime=="):
        assert any(r.startswith(pin) for r in reqs), f"{pin} not pinned in {reqs}"
    assert not any(r.startswith(("torch", "onnxruntime-gpu")) for r in reqs), "the CPU bento ships neither torch nor CUDA"

    # bentofile.yaml is the CPU flavour: two stages on python:3.11-slim (container/Dockerfile.j2).
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and "AS build" in dockerfile, dockerfile[:800]
    assert "build-essential" not in dockerfile and "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile
    assert "EXPOSE 3000" in dockerfile and "USER bentoml" in dockerfile and "ENTRYPOINT" in dockerfile


def test_serving_from_the_model_store(bundle: Path, tmp_path: Path) -> None:
    """IMGSERVE_MODELS=store:TAG loads a bundle imported into the BentoML model store (hash-checked)."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true",
           "IMGSERVE_MODELS": "store:digits:latest,named=store:digits:1"}
    code = (f"from imgformat.store import import_to_bentoml; import_to_bentoml({str(bundle)!r})\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "from service.config import load_settings\nfrom service.models import load_models\n"
            "ms = load_models(load_settings(), ThreadPoolExecutor(1))\n"
            "print(sorted(m.name for m in ms), [m.file.name for m in ms])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['digits', 'named'] ['model.onnx', 'model.onnx']" in out.stdout, out.stdout
    missing = subprocess.run([sys.executable, "-c", "from concurrent.futures import ThreadPoolExecutor\n"
                              "from service.config import load_settings\nfrom service.models import load_models\n"
                              "load_models(load_settings(), ThreadPoolExecutor(1))"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**env, "IMGSERVE_MODELS": "store:nothere:latest"})
    assert missing.returncode != 0 and "not in the BentoML model store" in missing.stderr, missing.stderr[-500:]
