"""Triton's model repository extension: load (a new version), unload, index, through tritonclient,
against a real ``bentoml serve`` with IMGSERVE_MODEL_CONTROL=explicit.

Version 2 of the digits bundle is version 1 with its logits doubled (an extra Mul node, hashes
rewritten): an exact, recognisable difference, so every answer can be checked against the version
it reports.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from service.launcher import rss_mib, start_service
from svc_factory import digit_uploads, png_bytes


def _rehash(bundle: Path, fname: str, **manifest_changes) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / fname).read_bytes()
    m["files"][fname].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    m.update(manifest_changes)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.fixture(scope="module")
def bundle_v2(bundle, tmp_path_factory) -> Path:
    import onnx
    from onnx import helper

    out = tmp_path_factory.mktemp("v2") / "digits"
    shutil.copytree(bundle, out)
    model = onnx.load(out / "model.onnx")
    g = model.graph
    old = g.output[0].name
    for node in g.node:  # rename the producer's output; a Mul node produces the graph output
        node.output[:] = [f"{old}_v1" if o == old else o for o in node.output]
    g.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    g.node.append(helper.make_node("Mul", [f"{old}_v1", "two"], [old]))
    onnx.save(model, out / "model.onnx")
    _rehash(out, "model.onnx", version="2")
    return out


@pytest.fixture(scope="module")
def repo_server(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-repo")
    env = {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_MODEL_CONTROL": "explicit"}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(repo_server) -> th.InferenceServerClient:
    return th.InferenceServerClient(repo_server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def image() -> bytes:
    imgs, _ = digit_uploads(1)
    return png_bytes(imgs[0])


def _logits(client: th.InferenceServerClient, image: bytes, model: str = "digits") -> tuple[str, np.ndarray]:
    inp = th.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image], dtype=np.object_))
    r = client.infer(model, [inp], outputs=[th.InferRequestedOutput("logits")])
    return r.get_response()["model_version"], r.as_numpy("logits")[0]


def _load(url: str, name: str, **params) -> httpx.Response:
    return httpx.post(f"{url}/v2/repository/models/{name}/load", json={"parameters": params}, timeout=60)


def test_load_switches_version_everywhere(client, repo_server, bundle, bundle_v2, image):
    v, logits1 = _logits(client, image)
    assert v == "1"
    client.load_model("digits", config=json.dumps({"bundle": str(bundle_v2)}))  # tritonclient's way
    assert client.get_model_metadata("digits")["versions"] == ["2"]
    v, logits2 = _logits(client, image)
    assert v == "2"
    np.testing.assert_allclose(logits2, 2 * logits1, rtol=1e-6)
    r = httpx.post(repo_server.url + "/classify", files={"image": ("d.png", image, "image/png")})
    assert r.json()["version"] == "2"
    assert client.get_model_repository_index() == [{"name": "digits", "version": "2", "state": "READY", "reason": ""}]
    assert _load(repo_server.url, "digits", bundle=str(bundle)).json() == {"name": "digits", "version": "1"}
    assert _logits(client, image)[0] == "1"


def test_load_from_the_bentoml_model_store(client, repo_server, bundle_v2, image):
    """A store tag instead of a path: the bundle imported into the server's own BENTOML_HOME."""
    import os
    import subprocess
    import sys

    home = repo_server.env["BENTOML_HOME"]
    code = f"from imgformat.store import import_to_bentoml; print(import_to_bentoml({str(bundle_v2)!r}))"
    tag = subprocess.run([sys.executable, "-c", code], env={**os.environ, "BENTOML_HOME": home}, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()[-1]
    assert tag == "digits:2"
    r = _load(repo_server.url, "from-store", store=tag)
    assert r.status_code == 200 and r.json() == {"name": "from-store", "version": "2"}, r.text
    assert _logits(client, image, "from-store")[0] == "2"
    client.unload_model("from-store")


def test_refused_loads_keep_the_served_version(client, repo_server, bundle_v2, tmp_path, image):
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_v2, tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    url = repo_server.url
    cases = [(_load(url, "digits", bundle=str(tampered)), "bytes, manifest says"),
             (_load(url, "digits", bundle=str(tmp_path / "missing")), "manifest.json missing"),
             (_load(url, "digits", store="nope:latest"), "not in the BentoML model store"),
             (_load(url, "digits", **{"file:1/model.onnx": "AAAA"}), "not supported"),
             (_load(url, "Bad Name", bundle=str(bundle_v2)), "must match"),
             (_load(url, "fresh"), "not known here")]
    for r, words in cases:
        assert r.status_code == 400 and words in r.json()["error"], r.text
    assert _logits(client, image)[0] == "1" and client.is_server_ready()


def test_unload_and_reload(client, repo_server, bundle, image):
    client.load_model("extra", config=json.dumps({"bundle": str(bundle)}))
    assert client.is_model_ready("extra") and _logits(client, image, "extra")[0] == "1"
    client.unload_model("extra")
    assert not client.is_model_ready("extra")
    with pytest.raises(InferenceServerException, match="unknown model"):
        _logits(client, image, "extra")
    assert {"name": "extra", "state": "UNAVAILABLE", "reason": "unloaded"} in client.get_model_repository_index()
    assert client.get_model_repository_index(query_params=None) and \
        httpx.post(repo_server.url + "/v2/repository/index", json={"ready": True}).json()[0]["name"] == "digits"
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.unload_model("extra")
    client.load_model("extra")  # no parameters: reload from where it came from
    assert _logits(client, image, "extra")[0] == "1"
    client.unload_model("extra")


def test_swap_under_closed_loop_of_8_clients(client, repo_server, bundle, bundle_v2, image):
    """8 clients (/classify and OIP alternately) while the version switches 6 times: every answer is
    2xx and matches the version it reports (never a half-loaded model)."""
    _, logits1 = _logits(client, image)
    probs = {"1": _softmax(logits1), "2": _softmax(2 * logits1)}
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def loop(i: int) -> None:
        c = th.InferenceServerClient(repo_server.url.removeprefix("http://"))
        with httpx.Client(base_url=repo_server.url, timeout=60) as h:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if (i + n) % 2:
                        r = h.post("/classify", files={"image": ("d.png", image, "image/png")}, data={"top_k": "10"})
                        body = r.json()
                        got = (r.status_code, body.get("version"),
                               {p["index"]: p["score"] for p in body.get("predictions", [])})
                    else:
                        v, lg = _logits(c, image)
                        got = (200, v, dict(enumerate(_softmax(lg))))
                except InferenceServerException as e:
                    got = (int(e.status() or 0), None, {})
                with lock:
                    answers.append(got)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        for k in range(6):
            time.sleep(0.4)
            assert _load(repo_server.url, "digits", bundle=str(bundle_v2 if k % 2 == 0 else bundle)).status_code == 200
        time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    statuses = Counter(a[0] for a in answers)
    assert statuses == Counter({200: len(answers)}), statuses
    versions = Counter(a[1] for a in answers)
    assert versions["1"] > 0 and versions["2"] > 0 and set(versions) == {"1", "2"}, versions
    print(f"\nswap under 8 clients: {len(answers)} answers, statuses {dict(statuses)}, versions {dict(versions)}")
    for _, v, scores in answers:
        np.testing.assert_allclose([scores[i] for i in range(10)], probs[v], rtol=1e-5, atol=1e-7)


def test_load_unload_cycles_do_not_grow_memory(client, repo_server, bundle, image):
    def rss() -> float:
        return rss_mib(repo_server.pids())

    client.load_model("cyc", config=json.dumps({"bundle": str(bundle)}))
    client.unload_model("cyc")
    before = rss()
    for _ in range(20):
        client.load_model("cyc", config=json.dumps({"bundle": str(bundle)}))
        _logits(client, image, "cyc")
        client.unload_model("cyc")
    after = rss()
    assert after <= before * 1.05, f"RSS {before:.1f} -> {after:.1f} MiB after 20 load/unload cycles"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()
