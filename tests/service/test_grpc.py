"""Open Inference Protocol v2 over gRPC through Triton's own client (``tritonclient.grpc``), unchanged,
against a real ``bentoml serve`` with IMGSERVE_GRPC_PORT set: the answers equal REST's, errors carry
the right status codes, the API key guards inference, and random bytes as a ModelInferRequest
answer an error status without harming the server.
"""
from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings, strategies as st
from tritonclient.utils import InferenceServerException

from svc_factory import digit_pngs, start_grpc_service, triton_bytes_input

KEY = "grpc-s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def grpc_server(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-grpc")
    env = {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_API_KEY": KEY,
           "IMGSERVE_MAX_BODY_BYTES": "3000000", "IMGSERVE_MAX_IMAGES": "16"}
    srv = start_grpc_service(env, tmp)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(grpc_server) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(grpc_server.grpc_url)


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    return digit_pngs(4)


_bytes_input = triton_bytes_input


def _rest_probabilities(server, files: list[bytes]) -> np.ndarray:
    rows = []
    for f in files:
        r = httpx.post(server.url + "/classify", files={"image": ("d.png", f, "image/png")}, data={"top_k": "10"},
                       headers=AUTH)
        assert r.status_code == 200, r.text
        scores = {p["index"]: p["score"] for p in r.json()["predictions"]}
        rows.append([scores[i] for i in range(10)])
    return np.array(rows, dtype=np.float32)


def test_health_and_metadata(client, grpc_server):
    assert client.is_server_live() and client.is_server_ready()  # public, as REST's health probes
    assert client.is_model_ready("digits", headers=AUTH) and not client.is_model_ready("nope", headers=AUTH)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.get_model_metadata("digits")  # behind the key, as on REST
    meta = client.get_server_metadata(headers=AUTH)
    assert meta.name == "imgserve" and "classification" in meta.extensions
    m = client.get_model_metadata("digits", headers=AUTH)
    assert list(m.versions) == ["1"] and m.inputs[0].name == "image" and list(m.inputs[0].shape) == [-1, 8, 8, 1]
    with grpc.insecure_channel(grpc_server.grpc_url) as ch:  # the standard health protocol, no key needed
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "inference.GRPCInferenceService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_bytes_images_equal_rest(client, grpc_server, files):
    """Encoded files over gRPC: probabilities equal /classify's; classification rows are ranked."""
    outs = [tg.InferRequestedOutput("probabilities"), tg.InferRequestedOutput("logits", class_count=3)]
    r = client.infer("digits", [_bytes_input(files)], outputs=outs, headers=AUTH, request_id="r1")
    assert r.get_response().id == "r1"
    np.testing.assert_allclose(r.as_numpy("probabilities"), _rest_probabilities(grpc_server, files), atol=1e-6)
    top = r.as_numpy("logits")
    assert top.shape == (len(files), 3)
    best = [int(row[0].decode().split(":")[1]) for row in top]
    assert best == r.as_numpy("probabilities").argmax(axis=1).tolist()


def test_uint8_raw_input_contents_equal_rest_oip(client, grpc_server):
    """UINT8 pixels travel in raw_input_contents; the answer equals REST OIP's for the same pixels."""
    px = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    inp = tg.InferInput("image", list(px.shape), "UINT8")
    inp.set_data_from_numpy(px)
    got = client.infer("digits", [inp], headers=AUTH).as_numpy("logits")
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(px.shape), "data": px.ravel().tolist()}],
            "outputs": [{"name": "logits"}]}
    rest = httpx.post(grpc_server.url + "/v2/models/digits/infer", json=body, headers=AUTH)
    assert rest.status_code == 200, rest.text
    want = np.array(rest.json()["outputs"][0]["data"], dtype=np.float32).reshape(got.shape)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("case, code", [
    ("no_key", "StatusCode.UNAUTHENTICATED"),
    ("unknown_model", "StatusCode.NOT_FOUND"),
    ("bad_shape", "StatusCode.INVALID_ARGUMENT"),
    ("not_an_image", "StatusCode.INVALID_ARGUMENT"),
])
def test_errors_have_status_codes(client, files, case, code):
    model, headers, inp = "digits", AUTH, _bytes_input(files[:1])
    if case == "no_key":
        headers = {}
    elif case == "unknown_model":
        model = "nope"
    elif case == "bad_shape":
        inp = tg.InferInput("image", [1, 4, 4, 1], "UINT8")
        inp.set_data_from_numpy(np.zeros((1, 4, 4, 1), np.uint8))
    else:
        inp = _bytes_input([b"not an image"])
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, [inp], headers=headers)
    assert e.value.status() == code, e.value


def test_a_bad_image_fails_alone(client, files):
    """Per-request isolation: concurrent good requests in the same batches answer while a bad one fails."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int):
        data = [b"junk"] if i % 4 == 0 else files[:2]
        try:
            return client.infer("digits", [_bytes_input(data)], headers=AUTH).as_numpy("probabilities").shape
        except InferenceServerException as e:
            return e.status()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(16)))
    assert [g for i, g in enumerate(got) if i % 4] == [(2, 10)] * 12, got
    assert [g for i, g in enumerate(got) if i % 4 == 0] == ["StatusCode.INVALID_ARGUMENT"] * 4, got


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=512))
def test_fuzz_model_infer_bytes(grpc_server, raw):
    """Arbitrary bytes as a ModelInferRequest: an error status (or an answer), never a crash or stall."""
    with grpc.insecure_channel(grpc_server.grpc_url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            call(raw, timeout=10, metadata=tuple(AUTH.items()))
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (e.code(), e.details())


def test_server_still_serves_after_fuzz(client, files):
    assert client.infer("digits", [_bytes_input(files[:1])], headers=AUTH).as_numpy("probabilities").shape == (1, 10)
