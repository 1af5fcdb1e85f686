"""Triton's model repository extension: load (a new version), unload, index, through tritonclient,
against a real ``bentoml serve`` with IMGSERVE_MODEL_CONTROL=explicit.

Version 2 of the digits bundle is version 1 with its logits doubled (an extra Mul node, hashes
rewritten): an exact, recognisable difference, so every answer can be checked against the version
it reports.
"""
from __future__ import annotations

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
from svc_factory import digit_uploads, logits_variant, png_bytes
from tritonclient._plugin import InferenceServerClientPlugin

KEY = "repo-s3cret"  # model control through the API needs an API key (the service refuses to start without)
AUTH = {"Authorization": f"Bearer {KEY}"}


class BearerKey(InferenceServerClientPlugin):
    """tritonclient sends the API key with every call."""

    def __call__(self, request) -> None:
        request.headers.update(AUTH)


def _triton(url: str) -> th.InferenceServerClient:
    c = th.InferenceServerClient(url.removeprefix("http://"))
    c.register_plugin(BearerKey())
    return c


@pytest.fixture(scope="module")
def bundle_v2(bundle, tmp_path_factory) -> Path:
    return logits_variant(bundle, tmp_path_factory.mktemp("v2") / "digits", "Mul", 2.0, "2")


@pytest.fixture(scope="module")
def repo_server(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-repo")
    # Every bundle these tests load lies under pytest's base temporary directory: the model root.
    env = {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_MODEL_CONTROL": "explicit", "IMGSERVE_API_KEY": KEY,
           "IMGSERVE_MODEL_ROOT": str(tmp_path_factory.getbasetemp())}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(repo_server) -> th.InferenceServerClient:
    return _triton(repo_server.url)


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
    return httpx.post(f"{url}/v2/repository/models/{name}/load", json={"parameters": params}, headers=AUTH,
                      timeout=60)


def test_load_switches_version_everywhere(client, repo_server, bundle, bundle_v2, image):
    v, logits1 = _logits(client, image)
    assert v == "1"
    client.load_model("digits", config=json.dumps({"bundle": str(bundle_v2)}))  # tritonclient's way
    assert client.get_model_metadata("digits")["versions"] == ["2"]
    v, logits2 = _logits(client, image)
    assert v == "2"
    np.testing.assert_allclose(logits2, 2 * logits1, rtol=1e-6)
    r = httpx.post(repo_server.url + "/classify", files={"image": ("d.png", image, "image/png")}, headers=AUTH)
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
        httpx.post(repo_server.url + "/v2/repository/index", json={"ready": True}, headers=AUTH).json()[0]["name"] == "digits"
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
        c = _triton(repo_server.url)
        with httpx.Client(base_url=repo_server.url, timeout=60, headers=AUTH) as h:
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


def test_loads_stay_under_the_model_root(repo_server, bundle_v2, tmp_path_factory, tmp_path):
    """Outside the root (absolute, ``..``, a symlink pointing out) is a 403 that names the model and
    no server path; inside it, a path relative to the root loads."""
    root = tmp_path_factory.getbasetemp()
    outside = Path("/tmp") / f"imgserve-outside-{tmp_path.name}"
    shutil.copytree(bundle_v2, outside)
    link = tmp_path / "link-out"
    link.symlink_to(outside)
    try:
        for where in (str(outside), str(root / ".." / outside.name), str(link), "/etc", "../../etc", str(root) + "x"):
            r = _load(repo_server.url, "sneaky", bundle=where)
            assert r.status_code == 403, (where, r.text)
            msg = r.json()["error"]
            assert "'sneaky'" in msg and "IMGSERVE_MODEL_ROOT" in msg and str(root) not in msg and "/tmp" not in msg, msg
    finally:
        shutil.rmtree(outside)
    r = _load(repo_server.url, "inside", bundle=str(bundle_v2.relative_to(root)))
    assert r.status_code == 200 and r.json() == {"name": "inside", "version": "2"}, r.text
    assert httpx.post(f"{repo_server.url}/v2/repository/models/inside/unload", headers=AUTH, timeout=60).status_code == 200


def test_load_errors_name_the_model_never_a_path(repo_server, bundle_v2, tmp_path, tmp_path_factory):
    """A manifest over 1 MiB is not read, and the errors a client reads carry no server path."""
    big = tmp_path / "big-manifest"
    shutil.copytree(bundle_v2, big)
    (big / "manifest.json").write_text(json.dumps({"pad": "x" * (1 << 20)}))
    tampered = tmp_path / "tampered2"
    shutil.copytree(bundle_v2, tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    cases = {"manifest over the cap": (big, "over the 1048576 a manifest may have"),
             "missing": (tmp_path / "missing", "manifest.json missing"),
             "tampered": (tampered, "bytes, manifest says")}
    for case, (where, words) in cases.items():
        r = _load(repo_server.url, "m1", bundle=str(where))
        msg = r.json()["error"]
        assert r.status_code == 400 and words in msg and "'m1'" in msg, (case, r.text)
        assert str(tmp_path_factory.getbasetemp()) not in msg and "/tmp" not in msg, (case, msg)


def test_model_files_over_the_cap_are_refused_before_hashing(bundle, tmp_path):
    """IMGSERVE_MAX_MODEL_BYTES: a model file bigger than the cap is refused from its size."""
    from imgformat.bundle import BundleError, load_bundle

    b = load_bundle(bundle)
    size = (bundle / "model.onnx").stat().st_size
    assert b.model_file("onnx", "fp32", max_bytes=size).name == "model.onnx"
    with pytest.raises(BundleError, match="IMGSERVE_MAX_MODEL_BYTES"):
        b.model_file("onnx", "fp32", max_bytes=size - 1)


def test_explicit_control_without_a_key_refuses_to_start(bundle, tmp_path):
    env = {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_MODEL_CONTROL": "explicit"}
    with pytest.raises(RuntimeError, match="exited"):
        start_service(env, tmp_path / "serve.log", tmp_path / "home", timeout_s=60)
    assert "IMGSERVE_MODEL_CONTROL=explicit needs an API key" in (tmp_path / "serve.log").read_text()
