"""Live statistics and drift scores (service/monitoring.py, service/drift.py) on a real `bentoml serve`,
and the offline report (monitoring/report.py) agreeing with it on the same images.

One server serves the same digits bundle (reference_stats over 300 held-out test images) under three
names, so each name has its own window: ``digits`` gets held-out *validation* images (in distribution,
never seen by the reference), ``inverted`` the same images inverted, ``oneclass`` only images the
model calls one class.
"""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.launcher import start_service

ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = 0.25  # PSI "large shift", the alert's threshold (deploy/monitoring/rules.yml)
MIN_SAMPLES = 100


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ref_bundle(trained_digits_run, tmp_path_factory) -> Path:
    """The digits model exported with a reference of 300 held-out test images (the shared fixture's 32
    would make the reference itself mostly sampling noise)."""
    from export import export_bundle

    out = tmp_path_factory.mktemp("monitoring") / "digits"
    return export_bundle(trained_digits_run / "best.pt", out, name="digits", version="1", samples=300, int8=False)


@pytest.fixture(scope="module")
def val_images(trained_digits_run) -> np.ndarray:
    """300 validation-split images, through the checkpoint's preprocessing (uint8 NHWC)."""
    from export.samples import from_dataset
    from training.checkpoint import load_checkpoint

    got = from_dataset(load_checkpoint(trained_digits_run / "best.pt"), "val", 300, seed=1)
    assert got is not None and len(got.images) >= 200
    return got.images


@pytest.fixture(scope="module")
def server(ref_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-monitoring")
    env = {"IMGSERVE_MODELS": f"digits={ref_bundle},inverted={ref_bundle},oneclass={ref_bundle}",
           "IMGSERVE_DRIFT_MIN_SAMPLES": str(MIN_SAMPLES),
           "IMGSERVE_MAX_LATENCY_MS": "20000"}  # a busy test machine's warm-up estimate must not shed a batch
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()


def send(url: str, model: str, images: list[bytes], per_request: int = 32) -> list[int]:
    """Classify ``images`` in order with /classify_batch; the top-1 index of each."""
    top1 = []
    for i in range(0, len(images), per_request):
        files = [("images", (f"{j}.png", b, "image/png")) for j, b in enumerate(images[i:i + per_request])]
        r = httpx.post(url + "/classify_batch", files=files, data={"model": model}, timeout=60)
        assert r.status_code == 200, r.text
        top1 += [res["predictions"][0]["index"] for res in r.json()["results"]]
    return top1


def drift_of(url: str, model: str) -> dict:
    doc = httpx.get(url + "/models", timeout=30).json()
    return next(m["drift"] for m in doc["models"] if m["name"] == model)


def samples(url: str, name: str) -> list:
    return [s for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)
            for s in fam.samples if s.name == name]


@pytest.fixture(scope="module")
def traffic(server, val_images) -> dict:
    """The three kinds of traffic, sent once: returns the PNG bodies by name."""
    normal = [png(a) for a in val_images]
    inverted = [png(255 - a) for a in val_images]
    top1 = send(server.url, "digits", normal)
    common = max(set(top1), key=top1.count)
    one = [b for b, t in zip(normal, top1) if t == common]
    send(server.url, "inverted", inverted)
    send(server.url, "oneclass", (one * math.ceil(MIN_SAMPLES / len(one)))[:MIN_SAMPLES + 20])
    return {"digits": normal, "inverted": inverted, "oneclass": one}


def test_in_distribution_stays_low_and_shifts_cross_the_threshold(server, traffic) -> None:
    ok = drift_of(server.url, "digits")
    assert ok["samples"] == len(traffic["digits"]) and ok["scores"] is not None, ok
    assert all(s["psi"] < THRESHOLD / 2 for s in ok["scores"].values()), ok["scores"]
    inv = drift_of(server.url, "inverted")["scores"]
    assert inv["brightness"]["psi"] > THRESHOLD and inv["class_mix"]["psi"] > THRESHOLD, inv
    one = drift_of(server.url, "oneclass")["scores"]
    assert one["class_mix"]["psi"] > 4 * THRESHOLD and one["class_mix"]["js"] > 0.3, one
    assert one["brightness"]["psi"] < one["class_mix"]["psi"], one  # the same kind of inputs, one class of them


def test_gauges_match_models_and_labels_are_bounded(server, traffic, ref_bundle) -> None:
    # /models just rescored every window and published the gauges; /metrics reads those
    scores = {m: drift_of(server.url, m)["scores"] for m in ("digits", "inverted", "oneclass")}
    gauges = samples(server.url, "imgserve_drift_score")
    assert {(s.labels["model"], s.labels["signal"], s.labels["metric"]) for s in gauges} == {
        (m, sig, met) for m in scores for sig in ("class_mix", "confidence", "brightness") for met in ("psi", "js")}
    for s in gauges:
        assert s.labels["version"] == "1"
        assert s.value == pytest.approx(scores[s.labels["model"]][s.labels["signal"]][s.labels["metric"]], rel=1e-9)
    classes = set(json.loads((ref_bundle / "manifest.json").read_text())["class_names"])
    preds = samples(server.url, "imgserve_predictions_total")
    assert {s.labels["class"] for s in preds} <= classes
    assert sum(s.value for s in preds if s.labels["model"] == "digits") == len(traffic["digits"])
    # the histograms carry the same counts as the window, in the reference's bins
    conf = [s for s in samples(server.url, "imgserve_confidence_count") if s.labels["model"] == "digits"]
    assert [s.value for s in conf] == [len(traffic["digits"])]
    buckets = [s for s in samples(server.url, "imgserve_input_brightness_bucket") if s.labels["model"] == "inverted"]
    observed = drift_of(server.url, "inverted")["observed"]["brightness"]
    cumulative = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
    assert cumulative[:-1] == list(np.cumsum(observed)), (cumulative, observed)
    sizes = [s for s in samples(server.url, "imgserve_input_pixels_count") if s.labels["model"] == "digits"]
    assert [s.value for s in sizes] == [len(traffic["digits"])]
    windows = {s.labels["model"]: s.value for s in samples(server.url, "imgserve_drift_window_samples")}
    assert windows["digits"] == len(traffic["digits"])
    # a name nobody serves is refused and adds no series
    r = httpx.post(server.url + "/classify", files={"image": ("x.png", traffic["digits"][0], "image/png")},
                   data={"model": "evil"}, timeout=30)
    assert r.status_code == 404
    assert all(s.labels["model"] != "evil" for s in samples(server.url, "imgserve_predictions_total"))


def test_decode_failures_counted_by_format(server, traffic) -> None:
    def failures() -> dict:
        return {s.labels["format"]: s.value for s in samples(server.url, "imgserve_decode_failures_total")
                if s.labels["model"] == "digits"}

    before = failures()
    bodies = {"png": traffic["digits"][0][:60], "unknown": b"not an image at all", "jpeg": b"\xff\xd8\xff\xe0broken"}
    for data in bodies.values():
        r = httpx.post(server.url + "/classify", files={"image": ("x", data, "application/octet-stream")},
                       data={"model": "digits"}, timeout=30)
        assert r.status_code == 400, r.text
    after = failures()
    assert {f: after.get(f, 0) - before.get(f, 0) for f in bodies} == {f: 1 for f in bodies}, (before, after)


def test_offline_report_gives_the_services_scores(server, traffic, ref_bundle, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, b in enumerate(traffic["inverted"]):
        (folder / f"{i:04d}.png").write_bytes(b)
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    out = subprocess.run([sys.executable, "-m", "monitoring.report", str(folder), str(ref_bundle), "--json",
                          "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    live = drift_of(server.url, "inverted")
    assert doc["observed"] == live["observed"] and doc["samples"] == live["samples"]
    for signal, s in live["scores"].items():
        for metric, v in s.items():
            assert doc["scores"][signal][metric] == pytest.approx(v, rel=1e-9, abs=1e-12), (signal, metric)
    assert doc["decode_failures"] == {"png": 1}
    page = (tmp_path / "report" / "report.html").read_text()
    assert "brightness" in page and "data:image/png;base64," in page
    assert (tmp_path / "report" / "report.png").read_bytes().startswith(b"\x89PNG")


def test_unloaded_version_stops_claiming_a_score(ref_bundle, traffic, tmp_path_factory) -> None:
    """Through the repository API: after an unload the version's gauges read NaN (its alert resolves)."""
    tmp = tmp_path_factory.mktemp("svc-monitoring-repo")
    auth = {"Authorization": "Bearer mon-s3cret"}
    env = {"IMGSERVE_MODELS": str(ref_bundle), "IMGSERVE_MODEL_CONTROL": "explicit", "IMGSERVE_API_KEY": "mon-s3cret",
           "IMGSERVE_MODEL_ROOT": str(ref_bundle.parent), "IMGSERVE_DRIFT_MIN_SAMPLES": "50",
           "IMGSERVE_MAX_LATENCY_MS": "20000"}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    try:
        r = httpx.post(srv.url + "/v2/repository/models/extra/load", json={"parameters": {"bundle": str(ref_bundle)}},
                       headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(traffic["inverted"][:60])]
        r = httpx.post(srv.url + "/classify_batch", files=files, data={"model": "extra"}, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(srv.url + "/models", headers=auth, timeout=30).status_code == 200  # rescores: gauges set

        def extra(name: str) -> list[float]:
            text = httpx.get(srv.url + "/metrics", headers=auth, timeout=30).text
            return [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                    if s.name == name and s.labels.get("model") == "extra"]

        assert extra("imgserve_drift_score") and all(v > 0 for v in extra("imgserve_drift_score"))
        r = httpx.post(srv.url + "/v2/repository/models/extra/unload", json={}, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        assert all(math.isnan(v) for v in extra("imgserve_drift_score")), extra("imgserve_drift_score")
        assert extra("imgserve_drift_window_samples") == [0]
    finally:
        srv.stop()
