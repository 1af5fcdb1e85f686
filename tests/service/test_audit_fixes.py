"""Fixes from the code audit of issue 14, each against a real `bentoml serve` or the real loader.

The model: a 2-class grey CNN (untrained, seeded) exported with FP16 by the real exporter, so a
plain ``curl -F image=@x`` must not ask for 5 classes, and on a host without CUDA its FP16 file is
recorded as never checked.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.launcher import start_service
from svc_factory import digit_uploads, png_bytes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def two_class_bundle(tmp_path_factory) -> Path:
    from export import export_bundle
    from imgformat.spec import make_preprocess
    from training.checkpoint import save_checkpoint
    from training.models import build_model

    tmp = tmp_path_factory.mktemp("two-class")
    torch.manual_seed(0)
    kwargs = {"num_classes": 2, "in_channels": 1, "input_size": 8, "head": [], "dropout": 0.0}
    ckpt = save_checkpoint(tmp / "two.pt", {
        "model": {"name": "simple_cnn", "kwargs": kwargs}, "num_classes": 2, "in_channels": 1, "input_size": 8,
        "preprocess": make_preprocess(channels=1, input_size=8, mean=[0.3], std=[0.3]), "class_names": ["cat", "dog"],
        "dataset": {"name": "digits", "seed": 0}, "state_dict": build_model("simple_cnn", **kwargs).state_dict(),
        "epoch": 0, "best_val_acc": 0.0, "metrics": {}, "config": {}})
    return export_bundle(ckpt, tmp / "two", name="two", version="1", samples=4, fp16=True)


@pytest.fixture(scope="module")
def server(two_class_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit-server")
    srv = start_service({"IMGSERVE_MODELS": str(two_class_bundle), "IMGSERVE_MAX_QUEUE": "4",
                         "IMGSERVE_MAX_BATCH_SIZE": "2", "IMGSERVE_MAX_IMAGES": "16"}, tmp / "serve.log", tmp / "home")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def png() -> bytes:
    return png_bytes(digit_uploads(1)[0][0])


def post(url: str, png: bytes, n: int = 1, **form) -> httpx.Response:
    if n == 1:
        return httpx.post(url + "/classify", files={"image": ("d.png", png, "image/png")}, data=form, timeout=30)
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(n)]
    return httpx.post(url + "/classify_batch", files=files, data=form, timeout=30)


def test_top_k_defaults_to_the_number_of_classes_when_fewer_than_5(server, png) -> None:
    r = post(server.url, png)
    assert r.status_code == 200, r.text
    assert sorted(p["label"] for p in r.json()["predictions"]) == ["cat", "dog"]


@pytest.mark.parametrize("value", ["null", "1e5", "[]", "two "])
def test_model_field_is_text_not_json(server, png, value: str) -> None:
    """`model=null` once selected the default model and `model=1e5` became a float."""
    r = post(server.url, png, model=value)
    assert r.status_code == 404, r.text
    assert repr(value) in r.json()["error"], r.text


@pytest.mark.parametrize("value,status", [("1", 200), (" 2 ", 200), ("2.0", 400), ("true", 400), ("null", 400)])
def test_top_k_is_the_only_converted_field(server, png, value: str, status: int) -> None:
    r = post(server.url, png, top_k=value)
    assert r.status_code == status, r.text


def test_a_request_over_the_queue_is_413(server, png) -> None:
    """5 images with IMGSERVE_MAX_QUEUE=4 can never be served: 413, not a 503 that invites a retry."""
    r = post(server.url, png, n=5)
    assert r.status_code == 413 and "IMGSERVE_MAX_QUEUE" in r.json()["error"], r.text
    assert "Retry-After" not in r.headers


def test_batches_never_exceed_max_batch_size(server, png) -> None:
    """4 images per request, 4 concurrent requests, IMGSERVE_MAX_BATCH_SIZE=2: every batch <= 2."""
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda _: post(server.url, png, n=4), range(4)))
    assert all(r.status_code in (200, 503) for r in rs) and any(r.status_code == 200 for r in rs), [r.text for r in rs]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    count = _metric(metrics, 'imgserve_batch_size_count{model="two"}')
    within = _metric(metrics, 'imgserve_batch_size_bucket{le="2.0",model="two"}')
    assert count > 0 and within == count, f"{count - within} of {count} batches were larger than 2"


def _metric(text: str, key: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))


# -- bundles whose gates failed or never ran ---------------------------------------------------------
def _edited(bundle: Path, tmp: Path, edit) -> Path:
    dst = tmp / "edited"
    shutil.copytree(bundle, dst)
    m = json.loads((dst / "manifest.json").read_text())  # not hashed: the model files are
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _load(bundle: Path, **env):
    from service.config import load_settings
    from service.models import load_model

    settings = load_settings({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_THREADS": "1", **env})
    with ThreadPoolExecutor(1) as pool:
        return load_model(settings.models[0], settings, pool)


def test_failed_parity_gate_is_refused_by_bentoml_serve_with_one_line(two_class_bundle, tmp_path) -> None:
    bad = _edited(two_class_bundle, tmp_path, lambda m: m["parity"].update(passed=False))
    with pytest.raises(RuntimeError):
        start_service({"IMGSERVE_MODELS": str(bad)}, tmp_path / "serve.log", tmp_path / "home", timeout_s=120)
    lines = [ln for ln in (tmp_path / "serve.log").read_text().splitlines() if "imgserve cannot start: " in ln]
    assert lines and "parity gate failed" in lines[0] and "IMGSERVE_ALLOW_UNCHECKED=1" in lines[0], lines
    assert _load(bad, IMGSERVE_ALLOW_UNCHECKED="1").name == "two"  # the explicit setting serves it


def test_fp16_never_checked_is_refused_unless_allowed(two_class_bundle) -> None:
    from imgformat.bundle import BundleError, load_manifest

    checked = load_manifest(two_class_bundle)["fp16"]["parity"]["checked"]
    if checked:  # exported on a GPU host: the FP16 gate ran and passed
        assert _load(two_class_bundle, IMGSERVE_PRECISION="fp16").name == "two"
        return
    with pytest.raises(BundleError, match="FP16 file was never checked on a GPU.*IMGSERVE_ALLOW_UNCHECKED"):
        _load(two_class_bundle, IMGSERVE_PRECISION="fp16")
    m = _load(two_class_bundle, IMGSERVE_PRECISION="fp16", IMGSERVE_ALLOW_UNCHECKED="1")
    assert m.file.name == "model.fp16.onnx"
    assert m.backend.run(np.zeros((1, 8, 8, 1), np.uint8)).shape == (1, 2)


def test_int8_without_its_gate_is_refused(two_class_bundle, tmp_path) -> None:
    from imgformat.bundle import BundleError, load_bundle

    b = load_bundle(_edited(two_class_bundle, tmp_path, lambda m: None))
    assert b.unchecked("fp32") == [] and b.unchecked("int8") == ["its INT8 file has no accuracy gate report"]
    with pytest.raises(BundleError, match="no accuracy gate report"):
        _load(b.path, IMGSERVE_PRECISION="int8")
