"""Several versions under one name, the traffic policy (file and HTTP), sticky users, shadow and
draining (issue 22, docs/rollouts.md), against a real ``bentoml serve``.

v1 is the digits bundle; v2 is v1 with a bias added to one class's logit, sized from the data so
that v2 disagrees with v1 on about half of the held-out digits: a known, exact difference, so the
shadow's agreement can be checked against the same figure computed offline with onnxruntime.
"""
from __future__ import annotations

import io
import json
import math
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.launcher import rss_mib
from service.traffic import bucket
from svc_factory import digit_uploads, logits_variant, png_bytes, start_grpc_service, triton_bytes_input

KEY = "rollout-s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
N_IMAGES = 60
BIASED_CLASS = 3


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    imgs, _ = digit_uploads(N_IMAGES)
    return [png_bytes(im) for im in imgs]


def _offline_logits(bundle: Path, images: list[bytes]) -> np.ndarray:
    """onnxruntime on the bundle's FP32 file, fed the bundle's own preprocessing of each upload."""
    import onnxruntime as ort

    from imgformat.preprocess import Preprocessor

    pre = Preprocessor.from_manifest(json.loads((bundle / "manifest.json").read_text())["preprocessing"])
    pixels = np.stack([pre.finish(pre.open(io.BytesIO(b))) for b in images])
    s = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return s.run([s.get_outputs()[0].name], {s.get_inputs()[0].name: pixels})[0].astype(np.float64)


@pytest.fixture(scope="module")
def bundle_v2(bundle, images, tmp_path_factory) -> Path:
    """v1 plus a bias on one class, halfway between two neighbouring flip points: about half of the
    images change their top-1 class, and none lies near a tie."""
    z = _offline_logits(bundle, images)
    flip = np.sort(z.max(axis=1) - z[:, BIASED_CLASS])  # the bias at which each image's answer turns
    flip = flip[flip > 0]
    k = len(flip) // 2
    bias = np.zeros(z.shape[1], np.float32)
    bias[BIASED_CLASS] = (flip[k - 1] + flip[k]) / 2
    assert flip[k] - flip[k - 1] > 1e-3, "two images flip at the same bias"
    return logits_variant(bundle, tmp_path_factory.mktemp("rollout-v2") / "digits", "Add", bias, "2")


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("traffic") / "traffic.yaml"
    p.write_text("digits: {weights: {v1: 100, v2: 0}}\n")
    return p


@pytest.fixture(scope="module")
def srv(bundle, bundle_v2, policy_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-rollout")
    env = {"IMGSERVE_MODELS": f"digits@v1={bundle},digits@v2={bundle_v2}", "IMGSERVE_TRAFFIC": str(policy_file),
           "IMGSERVE_MODEL_CONTROL": "explicit", "IMGSERVE_API_KEY": KEY,
           "IMGSERVE_MODEL_ROOT": str(tmp_path_factory.getbasetemp()),
           # nothing here tests shedding: the drain test's slow request must not be shed on a busy machine
           "IMGSERVE_MAX_LATENCY_MS": "10000"}
    s = start_grpc_service(env, tmp)  # gRPC on too: the same policy applies to both protocols
    yield s
    s.stop()


@pytest.fixture()
def http(srv):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        yield c


def _classify(http: httpx.Client, image: bytes, headers: dict | None = None, **fields) -> httpx.Response:
    return http.post("/classify", files={"image": ("d.png", image, "image/png")}, data={"top_k": "10", **fields},
                     headers=headers)


def _put(http: httpx.Client, doc) -> httpx.Response:
    body = doc if isinstance(doc, str) else json.dumps(doc)
    return http.put("/v2/repository/traffic", content=body)


def _oip_doc(image: bytes) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image.decode("latin-1")]}]}


def test_two_versions_served_and_a_named_version_always_answers(http, images):
    assert _put(http, {"digits": {"weights": {"v1": 100, "v2": 0}}}).status_code == 200
    models = http.get("/models").json()
    assert sorted((m["name"], m["version"], m["default_version"]) for m in models["models"]) == \
        [("digits", "v1", False), ("digits", "v2", True)]
    assert models["traffic"]["digits"]["weights"] == {"v1": 100, "v2": 0}
    for version in ("v1", "v2", "v2", "v1"):
        r = _classify(http, images[0], version=version)
        assert r.status_code == 200 and r.json()["version"] == version and r.headers["x-model-version"] == version
    r = _classify(http, images[0])
    assert r.json()["version"] == "v1" and r.headers["x-model-version"] == "v1"  # the policy's choice
    raw = {"Inference-Header-Content-Length": "0"}
    r = http.post("/v2/models/digits/versions/v2/infer", content=images[0], headers=raw)
    head = json.loads(r.content[:int(r.headers["inference-header-content-length"])])
    assert r.status_code == 200 and head["model_version"] == "v2" and r.headers["x-model-version"] == "v2"
    assert http.get("/v2/models/digits/versions/v2/ready").status_code == 200
    assert http.get("/v2/models/digits").json()["versions"] == ["v1", "v2"]
    assert http.get("/v2/models/digits/versions/v1").json()["versions"] == ["v1", "v2"]
    for r in (_classify(http, images[0], version="v9"), http.post("/v2/models/digits/versions/v9/infer",
                                                                   content=images[0], headers=raw),
              http.get("/v2/models/digits/versions/v9/ready")):
        assert r.status_code == 404 and "served versions: v1, v2" in r.json()["error"], r.text


def _wait_for_version(http: httpx.Client, image: bytes, version: str, timeout_s: float) -> float:
    """Seconds until 10 answers in a row come from ``version``."""
    t0, row = time.monotonic(), 0
    while row < 10:
        assert time.monotonic() - t0 < timeout_s, f"still not {version} after {timeout_s} s"
        row = row + 1 if _classify(http, image).json()["version"] == version else 0
    return time.monotonic() - t0


def test_the_policy_file_is_read_within_2_s_and_a_bad_one_is_refused_whole(http, policy_file, images):
    policy_file.write_text("digits: {weights: {v1: 100, v2: 0}}\n")
    _wait_for_version(http, images[0], "v1", 5)
    policy_file.write_text("digits: {weights: {v1: 0, v2: 100}}\n")
    took = _wait_for_version(http, images[0], "v2", 5)
    assert took < 2.0, f"the policy file took {took:.2f} s to take effect"
    # JSON too; a bad field refuses the whole document and the old policy stays
    policy_file.write_text(json.dumps({"digits": {"weights": {"v1": 50, "v2": 60}}}))
    time.sleep(1.5)
    info = http.get("/models").json()
    assert info["traffic"]["digits"]["weights"] == {"v1": 0, "v2": 100}
    assert "digits.weights: the weights sum to 110" in info["traffic_policy"]["file_error"], info["traffic_policy"]
    assert all(_classify(http, images[0]).json()["version"] == "v2" for _ in range(10))


def test_put_needs_the_key_and_refuses_a_bad_document_whole(srv, http):
    good = {"digits": {"weights": {"v1": 60, "v2": 40}, "sticky": "X-User-Id"}}
    assert _put(http, good).status_code == 200
    r = httpx.put(srv.url + "/v2/repository/traffic", content=json.dumps({"digits": {"weights": {"v1": 100}}}))
    assert r.status_code == 401
    assert httpx.get(srv.url + "/v2/repository/traffic").status_code == 401
    for bad, field in [("digits: {weights: {v1: 100}}\ncats: {weights: {a: 100}}", "cats"),
                       ({"digits": {"weights": {"v1": 100}, "shadow": {"version": "v7"}}}, "digits.shadow.version"),
                       ("digits: [", "not valid YAML or JSON")]:
        r = _put(http, bad)
        assert r.status_code == 400 and field in r.json()["error"], r.text
    assert http.get("/v2/repository/traffic").json() == {
        "digits": {"weights": {"v1": 60, "v2": 40}, "shadow": None, "sticky": "x-user-id"}}
    r = http.post("/v2/repository/models/digits/unload", json={"parameters": {"version": "v2"}})
    assert r.status_code == 409 and "change the traffic policy first" in r.json()["error"], r.text


def test_the_split_follows_the_weights(http, images):
    """400 requests at 70/30: the v2 count lies within 5 binomial standard deviations of 120
    (a chance of about 6e-7 to fail with a correct split)."""
    assert _put(http, {"digits": {"weights": {"v1": 70, "v2": 30}}}).status_code == 200
    n, p = 400, 0.30
    got = Counter(_classify(http, images[i % N_IMAGES]).json()["version"] for i in range(n))
    bound = 5 * math.sqrt(n * p * (1 - p))
    assert abs(got["v2"] - n * p) < bound and got["v1"] + got["v2"] == n, got


def test_sticky_users_keep_their_version(http, images):
    assert _put(http, {"digits": {"weights": {"v1": 50, "v2": 50}, "sticky": "X-User-Id"}}).status_code == 200
    users = [f"user-{i}" for i in range(40)]
    seen = {u: {_classify(http, images[0], headers={"X-User-Id": u}).json()["version"] for _ in range(3)}
            for u in users}
    assert all(len(v) == 1 for v in seen.values()), seen
    expected = {u: "v1" if bucket(u) < 50 else "v2" for u in users}  # the buckets laid on sorted versions
    assert {u: v.pop() for u, v in seen.items()} == expected
    assert set(expected.values()) == {"v1", "v2"}


def test_sticky_users_keep_their_version_over_grpc(http, srv, images):
    """The sticky key is read from the call's metadata, so a gRPC user lands where REST puts them."""
    import tritonclient.grpc as tg

    assert _put(http, {"digits": {"weights": {"v1": 50, "v2": 50}, "sticky": "X-User-Id"}}).status_code == 200
    client = tg.InferenceServerClient(srv.grpc_url)
    users = [f"user-{i}" for i in range(30)]
    seen = {u: {client.infer("digits", [triton_bytes_input(images[:1])],
                             headers={"authorization": AUTH["Authorization"], "x-user-id": u}).get_response().model_version for _ in range(3)}
            for u in users}
    assert all(len(v) == 1 for v in seen.values()), seen
    expected = {u: "v1" if bucket(u) < 50 else "v2" for u in users}
    assert {u: v.pop() for u, v in seen.items()} == expected
    assert set(expected.values()) == {"v1", "v2"}


def _metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(part in line for part in labels.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_shadow_agreement_equals_the_offline_agreement(http, bundle, bundle_v2, images):
    """v1 live, v2 in the shadow on every request: the answers are v1's, and the shadow's figures
    equal those computed offline on the same images: one client at a time and a small model leave
    nothing to shed."""
    z1, z2 = _offline_logits(bundle, images), _offline_logits(bundle_v2, images)
    assert 0 < int((z1.argmax(1) == z2.argmax(1)).sum()) < N_IMAGES, "the versions must disagree on some images"
    p1, p2 = (np.exp(z - z.max(1, keepdims=True)) for z in (z1, z2))
    p1, p2 = p1 / p1.sum(1, keepdims=True), p2 / p2.sum(1, keepdims=True)
    top = p1.argmax(1)

    def stats() -> dict:
        rows = http.get("/models").json()["traffic"]["digits"]["shadow_stats"]
        return next((s for s in rows if (s["live"], s["shadow"]) == ("v1", "v2")),
                    {"compared": 0, "agreed": 0, "shed": 0, "mean_abs_top1_delta": 0})

    before = stats()
    metrics_before = http.get("/metrics").text
    assert _put(http, {"digits": {"weights": {"v1": 100, "v2": 0},
                                  "shadow": {"version": "v2", "fraction": 1.0}}}).status_code == 200
    deadline, compared, last = time.monotonic() + 60, [], before
    for i, img in enumerate(images):
        r = _classify(http, img)
        body = r.json()
        assert body["version"] == "v1" and body["predictions"][0]["index"] == top[i], body  # never the shadow's
        # the next request only once this one's shadow run is done: one run at a time, else it is shed
        while (s := stats())["compared"] + s["shed"] == last["compared"] + last["shed"]:
            assert time.monotonic() < deadline, s
            time.sleep(0.005)
        if s["compared"] > last["compared"]:
            compared.append(i)
        last = s
    n = len(compared)
    assert n == N_IMAGES, f"{N_IMAGES - n} of {N_IMAGES} shed from one client"
    agreed = int((z1[compared].argmax(1) == z2[compared].argmax(1)).sum())
    delta = np.abs(p1[compared, top[compared]] - p2[compared, top[compared]]).sum()
    assert last["agreed"] - before["agreed"] == agreed and last["compared"] - before["compared"] == n, (last, agreed)
    delta_sum = last["mean_abs_top1_delta"] * last["compared"] - (before["mean_abs_top1_delta"] or 0) * before["compared"]
    assert delta_sum == pytest.approx(delta, abs=1e-4)
    text, labels = http.get("/metrics").text, 'model="digits",live="v1",shadow="v2"'
    for series, want in [("imgserve_shadow_compared_total", n), ("imgserve_shadow_agreed_total", agreed),
                         ("imgserve_shadow_top1_delta_count", n), ("imgserve_shadow_shed_total", N_IMAGES - n)]:
        assert _metric(text, series, labels) - _metric(metrics_before, series, labels) == want, series
    assert _metric(text, "imgserve_shadow_latency_seconds_count", labels) >= n
    assert _put(http, {"digits": {"weights": {"v1": 100, "v2": 0}}}).status_code == 200


def _slow_decodes(http: httpx.Client) -> float:
    """How many images the digits model took more than 25 ms to decode (the quick clients' 24x24
    PNGs take well under 1 ms)."""
    text = http.get("/metrics").text
    return (_metric(text, "imgserve_preprocess_seconds_count", 'model="digits"')
            - _metric(text, "imgserve_preprocess_seconds_bucket", 'le="0.025",model="digits"'))


def test_an_unloaded_version_drains_before_it_goes(srv, http, bundle, images):
    """v3 loaded beside v1 and v2 through the repository API, then unloaded while 6 clients send it
    batches: every answer is v3's (200) or, once it is gone, a 404 naming the served versions;
    requests in flight when the unload began finish on v3. One slow request (3 big PNGs, ~0.1 s
    each to decode) is admitted for sure when the unload starts: the server has finished decoding
    its first image. The quick clients alone could all be between requests at that moment."""
    assert _put(http, {"digits": {"weights": {"v1": 100, "v2": 0}}}).status_code == 200
    rss_before = rss_mib(srv.pids())
    r = http.post("/v2/repository/models/digits/load", json={"parameters": {"bundle": str(bundle), "version": "v3"}})
    assert r.status_code == 200 and r.json() == {"name": "digits", "version": "v3"}, r.text
    print(f"\nRSS {rss_before:.1f} -> {rss_mib(srv.pids()):.1f} MiB for a third version "
          f"({(bundle / 'model.onnx').stat().st_size / 2**20:.2f} MiB model file)")
    assert [m["version"] for m in http.get("/models").json()["models"]] == ["v1", "v2", "v3"]
    files = [("images", (f"{i}.png", images[i], "image/png")) for i in range(16)]
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                r = c.post("/classify_batch", files=files, data={"version": "v3"})
                with lock:
                    answers.append((t0, time.monotonic(), r.status_code, r.json()))

    big = png_bytes(Image.new("L", (5000, 5000), 128))  # 35 KB of file, 25 MP to decode
    slow_files = [("images", (f"big{i}.png", big, "image/png")) for i in range(3)]
    slow: list = []

    def slow_client() -> None:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
            t0 = time.monotonic()
            r = c.post("/classify_batch", files=slow_files, data={"version": "v3"})
            slow.append((t0, time.monotonic(), r.status_code, r.json()))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    slow_decodes_before = _slow_decodes(http)
    threads.append(threading.Thread(target=slow_client))
    threads[-1].start()
    deadline = time.monotonic() + 30
    while _slow_decodes(http) == slow_decodes_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _slow_decodes(http) > slow_decodes_before, "the slow request's first image was never decoded"
    t_unload = time.monotonic()
    r = http.post("/v2/repository/models/digits/unload", json={"parameters": {"version": "v3"}})
    t_unloaded = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert r.status_code == 200, r.text
    assert Counter(a[2] for a in answers).keys() <= {200, 404}, Counter(a[2] for a in answers)
    assert all(a[3]["version"] == "v3" for a in answers if a[2] == 200)
    assert all("served versions: v1, v2" in a[3]["error"] for a in answers if a[2] == 404)
    # requests under way when the unload began: those admitted before it finish on v3
    [(t0, t1, status, body)] = slow
    assert status == 200 and body["version"] == "v3" and t0 < t_unload < t1, (status, body)
    # the unload answers once it has drained: not before the slow request's answer was on its way
    # (50 ms: the two client threads take the GIL in either order; undrained, it answers ~0.2 s early)
    assert t_unloaded > t1 - 0.05, (t_unload, t_unloaded, t1)
    assert len(body["results"]) == 3
    assert any(a[2] == 404 for a in answers)
    assert [m["version"] for m in http.get("/models").json()["models"]] == ["v1", "v2"]


def test_put_is_off_without_explicit_model_control(server):
    """Like loads and unloads: without IMGSERVE_MODEL_CONTROL=explicit the policy is read-only."""
    r = httpx.put(server.url + "/v2/repository/traffic", content='{"digits": {"weights": {"1": 100}}}')
    assert r.status_code == 403 and "IMGSERVE_MODEL_CONTROL=explicit" in r.json()["error"], r.text
    assert httpx.get(server.url + "/v2/repository/traffic").json() == {}
