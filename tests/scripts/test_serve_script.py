"""`make serve DATA=folder MODEL=...` end to end (scripts/serve.sh, which the Makefile runs): a tiny
real folder of labelled images (scikit-learn digits as 32 px PNGs, three classes) is trained on,
exported behind the parity gate and served; the printed demo page answers, and /classify names the
folder's classes. Then `make bench` (the same script, `bench`) reuses both and measures the bundle."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.launcher import REPO, Server, free_port

CLASSES = {"zero": 0, "one": 1, "seven": 7}
PER_CLASS = 40


def write_folder(root: Path) -> dict[str, list[Path]]:
    """DIR/CLASS/N.png from scikit-learn's digits (8x8, 0..16), scaled to 32 px greyscale."""
    from sklearn.datasets import load_digits

    d = load_digits()
    files: dict[str, list[Path]] = {}
    for name, digit in CLASSES.items():
        (root / name).mkdir(parents=True)
        files[name] = []
        for i in np.flatnonzero(d.target == digit)[:PER_CLASS]:
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L").resize((32, 32), Image.BILINEAR)
            img.save(root / name / f"{i}.png")
            files[name].append(root / name / f"{i}.png")
    return files


def script_env(tmp: Path, data: Path, **extra: str) -> dict[str, str]:
    return {"PY": sys.executable, "DATA": str(data), "MODEL": "simple_cnn",
            "RUN": str(tmp / "run"), "BUNDLE": str(tmp / "bundle"), "TRAIN_ARGS": "--threads 1 --no-progress",
            "BENTOML_HOME": str(tmp / "bentoml_home"), **extra}


def test_make_serve_on_a_folder_then_bench(tmp_path: Path) -> None:
    data = tmp_path / "My Digits"   # a name with a space and capitals: the model name is cleaned up
    files = write_folder(data)
    port = free_port()
    server = Server([str(REPO / "scripts" / "serve.sh"), "serve"], f"http://127.0.0.1:{port}",
                    tmp_path / "serve.log", script_env(tmp_path, data, PORT=str(port)))
    with server.start():
        server.wait_ready(timeout_s=600)
        log = server.log_tail(200)
        assert f"demo page:  http://127.0.0.1:{port}/demo" in log, log
        assert "parity gate: PASSED" in log, log
        assert httpx.get(server.url + "/demo", timeout=10).status_code == 200
        models = httpx.get(server.url + "/models", timeout=10).json()
        (m,) = models["models"]
        assert m["name"] == "my-digits-simple_cnn" and m["class_names"] == sorted(CLASSES), m
        assert m["input"]["channels"] == 1 and m["input"]["height"] == 32, m["input"]
        right = 0
        for name, paths in files.items():
            for p in paths[-5:]:   # the same files the folder holds; 70/15/15 split, so some were held out
                r = httpx.post(server.url + "/classify", files={"image": (p.name, p.read_bytes(), "image/png")},
                               timeout=30)
                assert r.status_code == 200, r.text
                right += r.json()["predictions"][0]["label"] == name
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print(f"\nfolder run: test accuracy {metrics['test_acc']:.2f}, served top-1 right on {right}/15 files")
    assert metrics["test_acc"] >= 0.8 and right >= 12, (metrics["test_acc"], right)

    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk): the bench half needs it")
    import subprocess

    out = tmp_path / "bench"
    args = f"--concurrency 1,4 --duration 2s --no-floor --batches 1,4 --inproc-secs 0.5 --out {out}"
    p = subprocess.run([str(REPO / "scripts" / "serve.sh"), "bench"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, **script_env(tmp_path, data, BENCH_ARGS=args)})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "reusing " + str(tmp_path / "run" / "best.pt") in p.stdout and "reusing the bundle" in p.stdout, p.stdout
    result = json.loads((out / "bench.json").read_text())
    served = {r["concurrency"]: r for r in result["served"]}
    assert set(served) == {1, 4} and all(r["ok_rps"] > 0 for r in served.values()), served
    assert all(sum(n for s, n in r["statuses"].items() if not s.startswith("2")) == 0 for r in served.values()), served
