"""Open Inference Protocol v2 through the ecosystem's own clients, against a real ``bentoml serve``.

tritonclient[http] (Triton's client) and open-inference-openapi (the OIP working group's generated
client) talk to the service unchanged; raw httpx covers the error cases. KServe's own Python
client (``kserve``) is not used: it pins psutil<6 and protobuf 6, below what BentoML and
onnxruntime run with here (docs/protocol.md).
"""
from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from svc_factory import digit_uploads, png_bytes, send_together

N_IMAGES = 6


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    imgs, _ = digit_uploads(N_IMAGES)
    return [png_bytes(i) for i in imgs]


@pytest.fixture(scope="module")
def client(server) -> th.InferenceServerClient:
    return th.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def classify(server, files) -> list[dict]:
    """/classify's answer (every class) for each file: the reference every OIP answer must equal."""
    out = []
    for f in files:
        r = httpx.post(server.url + "/classify", files={"image": ("d.png", f, "image/png")}, data={"top_k": "10"})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def _bytes_input(files: list[bytes], binary: bool) -> th.InferInput:
    inp = th.InferInput("image", [len(files)], "BYTES")
    data = files if binary else [base64.b64encode(f) for f in files]  # JSON carries files as base64
    inp.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return inp


def _text(element) -> str:
    """A BYTES element as tritonclient returns it: bytes from binary data, str from JSON."""
    return element.decode() if isinstance(element, bytes) else element


def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("second")
    assert client.is_model_ready("digits", "1") and not client.is_model_ready("digits", "7")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(meta["extensions"]), meta
    m = client.get_model_metadata("digits")
    assert m["versions"] == ["1"] and m["platform"] == "onnx_onnxv1", m
    assert m["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 8, 8, 1]}], m
    assert [(o["name"], o["shape"]) for o in m["outputs"]] == [("logits", [-1, 10]), ("probabilities", [-1, 10])]
    assert client.get_model_metadata("digits", "1") == m
    cfg = client.get_model_config("digits")  # Triton's model configuration
    assert cfg["max_batch_size"] == 32 and cfg["input"][0]["dims"] == [8, 8, 1], cfg
    assert cfg["input"][0]["data_type"] == "TYPE_UINT8" and [o["dims"] for o in cfg["output"]] == [[10], [10]]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_answers_equal_classify(client, files, classify, binary):
    """Encoded files: probabilities and the classification extension equal /classify's answer."""
    outs = [th.InferRequestedOutput("probabilities", binary_data=binary),
            th.InferRequestedOutput("logits", binary_data=binary, class_count=10)]
    r = client.infer("digits", [_bytes_input(files, binary)], outputs=outs, request_id="req-7")
    assert r.get_response()["id"] == "req-7" and r.get_response()["model_version"] == "1"
    probs, ranked = r.as_numpy("probabilities"), r.as_numpy("logits")
    assert probs.shape == (N_IMAGES, 10) and ranked.shape == (N_IMAGES, 10)
    for i, ref in enumerate(classify):
        want = [(p["index"], p["label"]) for p in ref["predictions"]]
        got = [(int(c.split(":")[1]), c.split(":")[2]) for c in map(_text, ranked[i])]
        assert got == want, (i, got, want)
        np.testing.assert_allclose([probs[i, p["index"]] for p in ref["predictions"]],
                                   [p["score"] for p in ref["predictions"]], rtol=1e-6, atol=1e-7)


def test_classification_scores_are_classify_scores(client, files, classify):
    """On ``probabilities`` the classification value is /classify's score, digit for digit."""
    out = th.InferRequestedOutput("probabilities", binary_data=True, class_count=3)
    r = client.infer("digits", [_bytes_input(files[:1], True)], outputs=[out])
    got = [_text(c).split(":") for c in r.as_numpy("probabilities")[0]]
    want = [[repr(p["score"]), str(p["index"]), p["label"]] for p in classify[0]["predictions"][:3]]
    assert got == want


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_pixels_match_bytes(client, bundle, files, binary):
    """UINT8 [N, H, W, C] preprocessed by the service's own Preprocessor = the same files as BYTES."""
    from imgformat.bundle import load_bundle
    from imgformat.preprocess import Preprocessor

    pre = Preprocessor.from_manifest(load_bundle(bundle).manifest["preprocessing"], max_pixels=10**7)
    pixels = np.stack([pre(f) for f in files])
    inp = th.InferInput("image", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=binary)
    got = client.infer("digits", [inp], outputs=[th.InferRequestedOutput("logits", binary_data=binary)])
    ref = client.infer("digits", [_bytes_input(files, True)], outputs=[th.InferRequestedOutput("logits")])
    assert got.as_numpy("probabilities") is None  # requested outputs only
    np.testing.assert_allclose(got.as_numpy("logits"), ref.as_numpy("logits"), rtol=1e-5, atol=1e-5)


def test_raw_binary_request_and_output_default(server, files):
    """Inference-Header-Content-Length: 0: the body is one image file; outputs come back binary."""
    r = httpx.post(server.url + "/v2/models/digits/infer", content=files[0],
                   headers={"Inference-Header-Content-Length": "0"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    assert [o["name"] for o in head["outputs"]] == ["logits", "probabilities"]
    assert len(r.content) == n + 2 * 40 and all(o["parameters"]["binary_data_size"] == 40 for o in head["outputs"])
    probs = np.frombuffer(r.content[n + 40:], "<f4")
    assert abs(float(probs.sum()) - 1) < 1e-5


def test_open_inference_openapi_client(server, files, classify):
    from open_inference.openapi.client import OpenInferenceClient
    from open_inference.openapi.types import InferenceRequest, RequestInput, RequestOutput

    c = OpenInferenceClient(base_url=server.url)
    c.check_server_readiness()
    assert c.read_model_metadata("second").name == "second"
    req = InferenceRequest(id="oip-1", inputs=[RequestInput(name="image", shape=[1], datatype="BYTES",
                                                            data=[base64.b64encode(files[1]).decode()])],
                           outputs=[RequestOutput(name="probabilities")])
    res = c.model_infer("second", request=req)
    assert res.id == "oip-1" and [o.name for o in res.outputs] == ["probabilities"]
    probs = np.asarray(res.outputs[0].data.__root__, dtype=np.float64)  # TensorData is a pydantic root model
    best = classify[1]["predictions"][0]
    assert int(np.argmax(probs)) == best["index"] and abs(probs[best["index"]] - best["score"]) < 1e-6


def _infer_json(url: str, doc: dict, model: str = "digits", **kw) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/infer", content=json.dumps(doc), **kw)


def _bytes_doc(files: list[bytes], **extra) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(files)],
                        "data": [base64.b64encode(f).decode() for f in files]}], **extra}


BAD_REQUESTS = {
    "not json": (b"{nope", 400, "not valid JSON"),
    "no inputs": ({"inputs": []}, 400, "non-empty 'inputs'"),
    "wrong input name": ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": [0] * 64}]},
                         400, "named 'image'"),
    "fp32 input": ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8, 1], "data": [0.0] * 64}]},
                   400, "UINT8"),
    "uint8 wrong shape": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 9, 9, 1], "data": [0] * 81}]},
                          400, "[N, 8, 8, 1]"),
    "uint8 out of range": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1],
                                        "data": [256] * 64}]}, 400, "0..255"),
    "uint8 floats": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": [0.5] * 64}]},
                     400, "integers"),
    "count mismatch": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 8, 8, 1], "data": [0] * 64}]},
                       400, "needs 128 values"),
    "bytes not base64": ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
                         400, "base64"),
    "unknown output": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": [0] * 64}],
                        "outputs": [{"name": "softmax"}]}, 400, "no output 'softmax'"),
    "classification too big": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1],
                                            "data": [0] * 64}],
                                "outputs": [{"name": "logits", "parameters": {"classification": 11}}]}, 400, "10 classes"),
    "too many images": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [17, 8, 8, 1],
                                     "data": [0] * 64 * 17}]}, 413, "at most 16"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_client_mistakes_are_4xx(server, case):
    doc, status, words = BAD_REQUESTS[case]
    r = _infer_json(server.url, doc) if isinstance(doc, dict) else httpx.post(
        server.url + "/v2/models/digits/infer", content=doc)
    assert r.status_code == status and words in r.json()["error"], (r.status_code, r.text)


def test_binary_framing_errors(server, files):
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(files[0]) + 4}}]}).encode()
    ok_body = head + len(files[0]).to_bytes(4, "little") + files[0]
    cases = [(ok_body, str(len(head) + 1000), "only"),                     # header longer than the body
             (ok_body + b"xx", str(len(head)), "bytes of binary data after"),  # trailing bytes
             (ok_body[:-3], str(len(head)), "does not fit"),                 # truncated tensor
             (ok_body, "abc", "byte count")]
    for body, hlen, words in cases:
        r = httpx.post(server.url + "/v2/models/digits/infer", content=body,
                       headers={"Inference-Header-Content-Length": hlen})
        assert r.status_code == 400 and words in r.json()["error"], (hlen, r.text)
    r = httpx.post(server.url + "/v2/models/digits/infer", content=ok_body,
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text


def test_bad_file_names_its_index_and_spares_others(server, files):
    """A corrupt file is a 400 naming its index; concurrent good requests are unaffected."""
    bad = _bytes_doc([files[0], files[1], b"\x89PNG\r\n\x1a\n broken"])
    good = _bytes_doc(files[:2])
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(_infer_json, server.url, bad if i % 2 else good) for i in range(16)]
        answers = [f.result() for f in futs]
    for i, r in enumerate(answers):
        if i % 2:
            assert r.status_code == 400 and "element 2" in r.json()["error"], r.text
        else:
            assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 20, r.text


def test_not_found_and_body_limit(server, files):
    assert _infer_json(server.url, _bytes_doc(files[:1]), model="nope").status_code == 404
    r = httpx.post(server.url + "/v2/models/digits/versions/9/infer", content=json.dumps(_bytes_doc(files[:1])))
    assert r.status_code == 404 and "version '9'" in r.json()["error"]
    r = httpx.post(server.url + "/v2/models/digits/versions/1/infer", content=json.dumps(_bytes_doc(files[:1])))
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    big = b"x" * 3_100_000  # MAIN_ENV's body limit is 3 MB
    r = httpx.post(server.url + "/v2/models/digits/infer", content=big, headers={"Inference-Header-Content-Length": "0"})
    assert r.status_code == 413, r.text
    # Chunked (no Content-Length): the guard cuts the stream off at the limit, the lean route says 413.
    r = httpx.post(server.url + "/v2/models/digits/infer", content=iter([big[:1_000_000]] * 4),
                   headers={"Inference-Header-Content-Length": "0"})
    assert r.status_code == 413 and "IMGSERVE_MAX_BODY_BYTES" in r.json()["error"], r.text
    # Only POST infers; other methods reach the Starlette route and get its 405.
    assert httpx.get(server.url + "/v2/models/digits/infer").status_code == 405


def test_repository_off_by_default(client, server):
    assert [m["name"] for m in client.get_model_repository_index()] == ["digits", "second"]
    with pytest.raises(InferenceServerException, match="IMGSERVE_MODEL_CONTROL=explicit"):
        client.unload_model("second")
    assert client.is_model_ready("second")


def test_api_key_guards_infer_metadata_and_repository(strict_server, files):
    url = strict_server.url
    assert httpx.get(url + "/v2/health/ready").status_code == 200  # probes stay open
    assert httpx.get(url + "/v2/models/digits").status_code == 401  # metadata too needs the key (default-deny)
    assert httpx.get(url + "/v2/models/digits", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    assert _infer_json(url, _bytes_doc(files[:1])).status_code == 401
    assert httpx.post(url + "/v2/repository/index").status_code == 401
    key = {"Authorization": "Bearer s3cret-key"}
    c = th.InferenceServerClient(url.removeprefix("http://"))
    r = c.infer("digits", [_bytes_input(files[:1], True)], headers=key)
    assert r.as_numpy("logits").shape == (1, 10)
    assert c.get_model_repository_index(headers=key)[0]["state"] == "READY"


def test_metrics_count_oip_requests(server, files):
    """OIP requests show on /metrics like /classify's: BentoML's per-route counts (labelled by the route
    template; the model's name is in our per-model metrics), our refusals."""
    _infer_json(server.url, _bytes_doc(files[:1]))
    _infer_json(server.url, BAD_REQUESTS["fp32 input"][0])
    text = httpx.get(server.url + "/metrics").text
    assert 'endpoint="/v2/models/{name}/infer",http_response_code="200"' in text
    assert 'imgserve_errors_total{kind="bad_dtype"}' in text
    assert 'imgserve_batch_size_count{model="digits"}' in text


def test_admission_control_answers_503_with_retry_after(strict_server, files):
    """strict_server admits at most 4 images in flight: a burst of 4-image requests gets 503 +
    Retry-After for what does not fit and 200 for the rest; 5 images can never fit (413)."""
    key = {"Authorization": "Bearer s3cret-key"}
    doc = json.dumps(_bytes_doc(files[:4]))
    answers = send_together(strict_server, [httpx.Request("POST", f"{strict_server.url}/v2/models/digits/infer",
                                                          content=doc, headers=key) for _ in range(32)])
    refused = [r for r in answers if r.status_code == 503]
    assert {r.status_code for r in answers} <= {200, 503} and refused, [r.status_code for r in answers]
    assert all(int(r.headers["retry-after"]) >= 1 and "overloaded" in r.json()["error"] for r in refused)
    r = _infer_json(strict_server.url, _bytes_doc(files[:5]), headers=key)
    assert r.status_code == 413 and "never be served" in r.json()["error"], r.text
