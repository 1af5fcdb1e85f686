"""Triton's gRPC extensions (model configuration, model repository), admission control's
RESOURCE_EXHAUSTED with its retry hint, bounded gRPC metrics, and the Open Inference Protocol
working group's own gRPC client (``open-inference-grpc``, generated from KServe's
``open_inference_grpc.proto``), each against a real ``bentoml serve`` with IMGSERVE_GRPC_PORT set.

The server's queue holds 4 images (IMGSERVE_MAX_QUEUE): concurrent requests of 4 images each
overflow it, so shedding happens for real, not by a stub.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from service.oip_grpc_gen import grpc_service_pb2, model_config_pb2
from service.oip_grpc_gen import grpc_service_pb2_grpc as pb_grpc
from svc_factory import digit_pngs, start_grpc_service, triton_bytes_input

KEY = "grpc-ext-s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def model_root(bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-models")
    shutil.copytree(bundle, root / "copy")
    return root


@pytest.fixture(scope="module")
def srv(bundle, model_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-grpc-ext")
    env = {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_API_KEY": KEY,
           "IMGSERVE_MODEL_CONTROL": "explicit", "IMGSERVE_MODEL_ROOT": str(model_root),
           "IMGSERVE_MAX_QUEUE": str(MAX_QUEUE), "IMGSERVE_MAX_IMAGES": "4"}
    s = start_grpc_service(env, tmp)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(srv.grpc_url)


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    return digit_pngs(4)


_bytes_input = triton_bytes_input


def test_model_config_is_rests(client, srv):
    cfg = client.get_model_config("digits", headers=AUTH).config
    assert cfg.max_batch_size > 0 and list(cfg.input[0].dims) == [8, 8, 1]
    rest = httpx.get(srv.url + "/v2/models/digits/config", headers=AUTH).json()
    want = json_format.ParseDict(rest, model_config_pb2.ModelConfig())  # REST's JSON in the message's form
    for key in ("name", "platform", "backend", "max_batch_size", "input", "output", "version_policy"):
        assert getattr(cfg, key) == getattr(want, key), key
    assert list(cfg.version_policy.specific.versions) == [1]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("nope", headers=AUTH)
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_repository_load_infer_unload(client, srv, files):
    """tritonclient.grpc's load_model / get_model_repository_index / unload_model, unchanged; the loaded
    model answers over gRPC and REST alike (one repository)."""
    with pytest.raises(InferenceServerException) as e:
        client.load_model("second", config=json.dumps({"bundle": "copy"}))
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    client.load_model("second", config=json.dumps({"bundle": "copy"}), headers=AUTH)
    index = {m.name: m for m in client.get_model_repository_index(headers=AUTH).models}
    assert index["second"].state == "READY" and index["digits"].state == "READY"
    a = client.infer("second", [_bytes_input(files[:2])], headers=AUTH).as_numpy("probabilities")
    b = client.infer("digits", [_bytes_input(files[:2])], headers=AUTH).as_numpy("probabilities")
    np.testing.assert_array_equal(a, b)  # the same bundle under two names
    assert httpx.get(srv.url + "/v2/models/second/ready", headers=AUTH).status_code == 200

    client.unload_model("second", headers=AUTH)
    index = {m.name: m for m in client.get_model_repository_index(headers=AUTH).models}
    assert index["second"].state == "UNAVAILABLE" and index["second"].reason == "unloaded"
    with grpc.insecure_channel(srv.grpc_url) as ch:  # tritonclient has no ``ready`` argument: the stub
        ready = pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(
            grpc_service_pb2.RepositoryIndexRequest(ready=True), metadata=tuple(AUTH.items()), timeout=30)
    assert [m.name for m in ready.models] == ["digits"]
    with pytest.raises(InferenceServerException) as e:
        client.infer("second", [_bytes_input(files[:1])], headers=AUTH)
    assert e.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("name, config, code", [
    ("outside", {"bundle": "../.."}, "StatusCode.PERMISSION_DENIED"),  # not under the model root
    ("missing", {"bundle": "no-such-dir"}, "StatusCode.INVALID_ARGUMENT"),
    ("bad name!", {"bundle": "copy"}, "StatusCode.INVALID_ARGUMENT"),
])
def test_repository_errors(client, model_root, name, config, code):
    with pytest.raises(InferenceServerException) as e:
        client.load_model(name, config=json.dumps(config), headers=AUTH)
    assert e.value.status() == code, e.value
    assert str(model_root) not in str(e.value.message()), "a server path leaked"


def test_unload_unknown_is_not_found(client):
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("never-loaded", headers=AUTH)
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_overload_is_resource_exhausted_with_retry_hint(srv, client, files):
    """48 concurrent requests of 4 images against a queue of 4: some are shed with RESOURCE_EXHAUSTED
    and both retry hints in the trailing metadata, the others answer; none fails otherwise."""
    inp = _bytes_input(files[:4])
    request = grpc_service_pb2.ModelInferRequest(model_name="digits", inputs=[
        grpc_service_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[4], contents=grpc_service_pb2.InferTensorContents(
                bytes_contents=files[:4]))])

    def outcome(call: grpc.Future) -> tuple[str, dict]:
        try:
            call.result()
            return "OK", {}
        except grpc.RpcError as e:
            return e.code().name, dict(e.trailing_metadata() or ())

    with grpc.insecure_channel(srv.grpc_url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        # all 48 calls started from one thread before any answer is read: gRPC's C core sends them at
        # once, so they meet in the server's queue however slowly this process's threads are scheduled
        calls = [stub.ModelInfer.future(request, metadata=tuple(AUTH.items()), timeout=60) for _ in range(48)]
        got = [outcome(call) for call in calls]
    codes = [c for c, _ in got]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
    for code, trailers in got:
        if code == "RESOURCE_EXHAUSTED":
            seconds = int(trailers["retry-after"])
            assert seconds >= 1 and int(trailers["grpc-retry-pushback-ms"]) == 1000 * seconds, trailers
    assert client.infer("digits", [inp], headers=AUTH).as_numpy("probabilities").shape == (4, 10)


def _series(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.M)}


def test_metrics_count_methods_and_codes_with_bounded_labels(srv, client, files):
    client.infer("digits", [_bytes_input(files[:1])], headers=AUTH)
    with grpc.insecure_channel(srv.grpc_url) as ch:
        for i in range(300):  # distinct invented methods: one label between them
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/x{i}.Service/Method{i}")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    text = httpx.get(srv.url + "/metrics", headers=AUTH).text
    calls = _series(text, "imgserve_grpc_requests_total")
    assert calls['code="OK",method="ModelInfer"'] >= 1, calls
    assert calls['code="UNIMPLEMENTED",method="unmatched"'] >= 300, calls
    assert all(re.fullmatch(r'code="[A-Z_]+",method="[A-Za-z]+"', k) for k in calls), calls
    assert "x17.Service" not in text
    assert 'imgserve_grpc_request_seconds_count{method="ModelInfer"}' in text


KSERVE_CLIENT = r'''
import json, sys
import grpc, numpy as np
from open_inference.grpc.service import GRPCInferenceServiceStub
from open_inference.grpc import protocol as p

url, key, png = sys.argv[1], sys.argv[2], bytes.fromhex(sys.stdin.read())
auth = (("authorization", "Bearer " + key),)
stub = GRPCInferenceServiceStub(grpc.insecure_channel(url))
out = {"live": stub.ServerLive(p.ServerLiveRequest()).live,
       "ready": stub.ModelReady(p.ModelReadyRequest(name="digits"), metadata=auth).ready}
meta = stub.ModelMetadata(p.ModelMetadataRequest(name="digits"), metadata=auth)
out["input"] = [meta.inputs[0].name, meta.inputs[0].datatype, list(meta.inputs[0].shape)]
px = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
r = stub.ModelInfer(p.ModelInferRequest(model_name="digits", inputs=[
        p.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 8, 8, 1])],
    raw_input_contents=[px.tobytes()], outputs=[p.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
    metadata=auth)
out["uint8_logits"] = np.frombuffer(r.raw_output_contents[0], "<f4").tolist()
r = stub.ModelInfer(p.ModelInferRequest(model_name="digits", inputs=[
        p.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1],
                                             contents=p.InferTensorContents(bytes_contents=[png]))],
    outputs=[p.ModelInferRequest.InferRequestedOutputTensor(
        name="probabilities", parameters={"classification": p.InferParameter(int64_param=3)})]), metadata=auth)
raw = r.raw_output_contents[0]
rows, i = [], 0
while i < len(raw):
    n = int.from_bytes(raw[i:i + 4], "little"); rows.append(raw[i + 4:i + 4 + n].decode()); i += 4 + n
out["top3"] = rows
print(json.dumps(out))
'''


def test_open_inference_grpc_client_unchanged(srv, files):
    """KServe's protocol through the OIP working group's generated client, in its own process: its
    descriptors (open_inference_grpc.proto) and tritonclient's both define ``inference.*``, and one
    process's protobuf pool takes only one of them."""
    run = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, srv.grpc_url, KEY], input=files[0].hex(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["live"] and got["ready"] and got["input"] == ["image", "UINT8", [-1, 8, 8, 1]]
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": list(range(64))}],
            "outputs": [{"name": "logits"}]}
    rest = httpx.post(srv.url + "/v2/models/digits/infer", json=body, headers=AUTH).json()
    np.testing.assert_allclose(got["uint8_logits"], rest["outputs"][0]["data"], atol=1e-6)
    r = httpx.post(srv.url + "/classify", files={"image": ("d.png", files[0], "image/png")}, data={"top_k": "3"},
                   headers=AUTH).json()
    assert [int(row.split(":")[1]) for row in got["top3"]] == [p["index"] for p in r["predictions"]]
