"""The service against a real ``bentoml serve`` on a free loopback port (fixtures in conftest.py)."""
from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from svc_factory import digit_uploads, png_bytes, send_together

N_IMAGES = 64


@pytest.fixture(scope="module")
def uploads() -> tuple[list[bytes], np.ndarray]:
    imgs, labels = digit_uploads(N_IMAGES)
    return [png_bytes(im) for im in imgs], labels


@pytest.fixture(scope="module")
def reference(checkpoint, uploads) -> np.ndarray:
    """The PyTorch eval pipeline on the same PNG files: eval_transform + the checkpoint's eager model."""
    import torch

    from training.checkpoint import build_from_checkpoint, load_checkpoint
    from training.transforms import eval_transform

    ckpt = load_checkpoint(checkpoint)
    model, tf = build_from_checkpoint(ckpt), eval_transform(ckpt["preprocess"])
    x = torch.stack([tf(Image.open(io.BytesIO(b))) for b in uploads[0]])
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1).numpy()


def classify(url: str, data: bytes, timeout: float = 30.0, **form) -> httpx.Response:
    return httpx.post(url + "/classify", files={"image": ("x.png", data, "image/png")},
                      data={k: str(v) for k, v in form.items()}, timeout=timeout)


def probs_of(body: dict, n: int) -> np.ndarray:
    p = np.zeros(n)
    for pred in body["predictions"]:
        p[pred["index"]] = pred["score"]
    return p


def metric_value(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- endpoints -------------------------------------------------------------------------------------
def test_classify_answer_shape(server, uploads) -> None:
    r = classify(server.url, uploads[0][0], top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"]) == ("digits", "1")
    scores = [p["score"] for p in body["predictions"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-9
    assert {p["label"] for p in body["predictions"]} <= {str(i) for i in range(10)}
    assert r.headers["content-type"].startswith("application/json")


def test_served_equals_pytorch_pipeline(server, uploads, reference) -> None:
    for i in range(16):
        r = classify(server.url, uploads[0][i], top_k=10)
        assert r.status_code == 200, r.text
        served = probs_of(r.json(), 10)
        diff = np.abs(served - reference[i]).max()
        assert diff <= 1e-4, f"image {i}: served probabilities differ from eval_transform+eager by {diff:.2e}"


def test_classify_batch_keeps_order(server, uploads, reference) -> None:
    files = [("images", (f"{i}.png", uploads[0][i], "image/png")) for i in range(8)]
    r = httpx.post(server.url + "/classify_batch", files=files, data={"top_k": "10"}, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 8
    for i, res in enumerate(results):
        assert np.abs(probs_of(res, 10) - reference[i]).max() <= 1e-4, f"result {i} is not image {i}'s"


def test_model_selection_and_models_list(server, uploads) -> None:
    r = classify(server.url, uploads[0][0], model="second")
    assert r.status_code == 200 and r.json()["model"] == "second", r.text
    m = httpx.get(server.url + "/models", timeout=10).json()
    assert m["default"] == "digits" and [x["name"] for x in m["models"]] == ["digits", "second"]
    first = m["models"][0]
    assert first["class_names"] == [str(i) for i in range(10)] and first["backend"] == "onnx"
    assert first["device"] in ("cpu", "cuda") and first["input"]["dtype"] == "uint8"
    assert first["reference_stats"]["present"] is True and first["reference_stats"]["stats_version"] == 1


def test_startup_log_says_which_write_path_is_active(server) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "imgserve write path: one socket write per response" in log, log[-2000:]


def test_health_metrics_and_docs(server) -> None:
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path
    assert "text/html" in httpx.get(server.url + "/", timeout=10).headers["content-type"]
    spec = httpx.get(server.url + "/docs.json", timeout=10).json()
    assert {"/classify", "/classify_batch"} <= set(spec["paths"]), sorted(spec["paths"])


def test_sync_http_client(server, uploads, tmp_path: Path) -> None:
    import bentoml

    f = tmp_path / "digit.png"
    f.write_bytes(uploads[0][1])
    with bentoml.SyncHTTPClient(server.url) as client:
        out = client.classify(image=f, top_k=2)
    out = out if isinstance(out, dict) else out.model_dump()
    assert out["model"] == "digits" and len(out["predictions"]) == 2, out


def test_no_torch_in_onnx_server(server) -> None:
    """The serving processes never map libtorch when only ONNX is served."""
    import psutil

    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    for p in procs:
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        assert "libtorch" not in maps, f"process {p.pid} ({' '.join(p.cmdline()[:3])}) loaded torch"


# -- concurrency -----------------------------------------------------------------------------------
def test_concurrent_requests_get_their_own_answer(server, uploads, reference) -> None:
    before = httpx.get(server.url + "/metrics", timeout=10).text
    reqs = [httpx.Request("POST", server.url + "/classify", files={"image": ("x.png", b, "image/png")},
                          data={"top_k": "10"}) for b in uploads[0]]
    rs = send_together(server, reqs)
    for i, r in enumerate(rs):
        assert r.status_code == 200, (i, r.text)
        assert np.abs(probs_of(r.json(), 10) - reference[i]).max() <= 1e-4, f"request {i} got another image's answer"
    after = httpx.get(server.url + "/metrics", timeout=10).text
    name, lab = "imgserve_batch_size_", 'model="digits"'
    batches = metric_value(after, name + "count", lab) - metric_value(before, name + "count", lab)
    single = metric_value(after, name + "bucket", 'le="1.0",model="digits"') - metric_value(before, name + "bucket", 'le="1.0",model="digits"')
    assert batches < N_IMAGES and batches - single >= 1, f"no batch above 1 formed: {batches} batches, {single} of size 1"


def test_bad_image_fails_alone(server, uploads, reference) -> None:
    good = uploads[0][:15]
    corrupt = uploads[0][15][:40]  # a PNG cut inside its first chunk
    payloads = [*good[:7], corrupt, *good[7:]]
    with ThreadPoolExecutor(len(payloads)) as pool:
        rs = list(pool.map(lambda b: classify(server.url, b, top_k=10), payloads))
    assert rs[7].status_code == 400 and "error" in rs[7].json(), rs[7].text
    for j, r in enumerate(rs[:7] + rs[8:]):
        assert r.status_code == 200, r.text
        assert np.abs(probs_of(r.json(), 10) - reference[j]).max() <= 1e-4


# -- the error table -------------------------------------------------------------------------------
def _png_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # 9 Mpx > IMGSERVE_MAX_PIXELS=4e6, 9 KB on the wire
    return buf.getvalue()


@pytest.mark.parametrize("case,status", [
    ("text", 400), ("empty", 400), ("truncated_png", 400), ("eps", 400), ("bomb", 413),
    ("unknown_model", 404), ("top_k_zero", 400), ("top_k_big", 400), ("top_k_text", 400),
])
def test_error_rows(server, uploads, case: str, status: int) -> None:
    png = uploads[0][0]
    data, form = {
        "text": (b"not an image at all", {}), "empty": (b"", {}), "truncated_png": (png[: len(png) // 2], {}),
        "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", {}), "bomb": (_png_bomb(), {}),
        "unknown_model": (png, {"model": "../etc/passwd"}), "top_k_zero": (png, {"top_k": 0}),
        "top_k_big": (png, {"top_k": 11}), "top_k_text": (png, {"top_k": "many"}),
    }[case]
    r = classify(server.url, data, **form)
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and "Traceback" not in r.text, r.text
    if case == "unknown_model":
        assert body["models"] == ["digits", "second"] and "digits" in body["error"]


@pytest.mark.parametrize("case,status", [("missing_field", 400), ("text_field", 400), ("json", 400),
                                         ("too_large", 413), ("too_large_chunked", 413), ("too_many_files", 413)])
def test_request_level_errors(server, uploads, case: str, status: int) -> None:
    png, url = uploads[0][0], server.url
    if case == "missing_field":
        r = httpx.post(url + "/classify", files={"picture": ("x.png", png, "image/png")}, timeout=10)
    elif case == "text_field":
        r = httpx.post(url + "/classify", data={"image": "http://127.0.0.1:1/x.png"}, files={"other": ("a", b"b")}, timeout=10)
    elif case == "json":
        r = httpx.post(url + "/classify", json={"image": "x"}, timeout=10)
    elif case == "too_large":
        r = classify(url, b"\0" * 3_100_000)
    elif case == "too_large_chunked":
        head = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        r = httpx.post(url + "/classify", content=iter([head] + [b"\0" * 1_000_000] * 4),  # no Content-Length
                       headers={"content-type": "multipart/form-data; boundary=x"}, timeout=10)
    else:
        files = [("images", (f"{i}.png", png, "image/png")) for i in range(17)]
        r = httpx.post(url + "/classify_batch", files=files, timeout=10)
    assert r.status_code == status, r.text
    assert isinstance(r.json().get("error"), str), r.text


def test_server_log_has_no_traceback_for_bad_input(server) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, server.log_tail(60)


# -- the strict server: API key, BentoML's batcher, overload ----------------------------------------
def test_api_key_required(strict_server, uploads) -> None:
    url, png = strict_server.url, uploads[0][0]
    assert classify(url, png).status_code == 401
    bad = httpx.post(url + "/classify", files={"image": ("x.png", png)}, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401 and "error" in bad.json()
    ok = httpx.post(url + "/classify", files={"image": ("x.png", png)},
                    headers={"Authorization": "Bearer s3cret-key"}, timeout=10)
    assert ok.status_code == 200, ok.text
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(url + path, timeout=10).status_code == 200, path
    assert "s3cret-key" not in strict_server.log_path.read_text(errors="replace"), "the API key leaked into the log"


def test_overload_is_503_with_retry_after(strict_server, uploads, reference) -> None:
    """At most 4 images in flight: 32 concurrent 4-image requests overlap, the excess is shed with
    503 + Retry-After at the door, the accepted ones are answered right, and service recovers at once."""
    url, auth = strict_server.url, {"Authorization": "Bearer s3cret-key"}

    def request(i: int) -> httpx.Request:
        files = [("images", (f"{j}.png", uploads[0][j], "image/png")) for j in range(i, i + 4)]
        return httpx.Request("POST", url + "/classify_batch", files=files, data={"top_k": "10"}, headers=auth)

    rs = send_together(strict_server, [request(i) for i in range(32)])
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    for i, r in enumerate(rs):
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and "overloaded" in r.json()["error"], r.text
            continue
        for j, res in enumerate(r.json()["results"]):
            assert np.abs(probs_of(res, 10) - reference[i + j]).max() <= 1e-4, f"accepted request {i} answered wrong"
    assert httpx.get(url + "/readyz", timeout=10).status_code == 200
    with httpx.Client(timeout=30) as client:
        assert client.send(request(0)).status_code == 200, "did not recover after the burst"
