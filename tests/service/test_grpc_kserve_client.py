"""KServe's own Python clients (``kserve.inference_client.InferenceGRPCClient`` and
``InferenceRESTClient`` with the v2 protocol, the SDK's InferRequest/InferInput types), unchanged,
against a real ``bentoml serve`` with gRPC on.

kserve pins protobuf<7 and psutil<6, which the serving stack cannot share, so the client runs in its
own venv (``.venv-kserve``, made by scripts/setup.sh from tests/clients/kserve.txt) and reports JSON.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from svc_factory import digit_pngs, start_grpc_service

KEY = "kserve-client-s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
KSERVE_PY = Path(__file__).resolve().parents[2] / ".venv-kserve" / "bin" / "python"

CLIENT = r'''
import asyncio, json, sys
import grpc, numpy as np
from kserve.inference_client import InferenceGRPCClient, InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

url, rest_url, key, png = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.stdin.read())
auth = (("authorization", "Bearer " + key),)


async def main():
    out = {}
    async with InferenceGRPCClient(url, retries=0) as c:
        out["live"] = await c.is_server_live()
        out["ready"] = await c.is_server_ready()
        out["model_ready"] = await c.is_model_ready("digits", headers=auth)
        px = InferInput("image", [1, 8, 8, 1], "UINT8")
        px.set_data_from_numpy(np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1), binary_data=True)
        r = await c.infer(InferRequest("digits", [px], request_outputs=[RequestedOutput("logits")]), headers=auth)
        out["uint8_logits"] = r.get_output_by_name("logits").as_numpy().ravel().tolist()
        out["model_version"] = r.model_version
        img = InferInput("image", [1], "BYTES", data=[png])
        r = await c.infer(InferRequest("digits", [img]), headers=auth)
        out["probabilities"] = r.get_output_by_name("probabilities").as_numpy().ravel().tolist()
        try:
            await c.infer(InferRequest("digits", [img]))
        except grpc.RpcError as e:
            out["no_key"] = e.code().name
        try:
            await c.infer(InferRequest("nope", [img]), headers=auth)
        except grpc.RpcError as e:
            out["unknown_model"] = e.code().name
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    out["rest_model_ready"] = await rest.is_model_ready(rest_url, "digits", headers=dict(auth))
    px = InferInput("image", [1, 8, 8, 1], "UINT8")
    px.set_data_from_numpy(np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1), binary_data=False)
    r = await rest.infer(rest_url, InferRequest("digits", [px], request_outputs=[RequestedOutput("logits")]),
                         model_name="digits", headers=dict(auth))
    out["rest_uint8_logits"] = r.get_output_by_name("logits").as_numpy().ravel().tolist()
    await rest.close()
    print(json.dumps(out))

asyncio.run(main())
'''


@pytest.fixture(scope="module")
def srv(bundle, tmp_path_factory):
    s = start_grpc_service({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_API_KEY": KEY},
                           tmp_path_factory.mktemp("svc-grpc-kserve"))
    yield s
    s.stop()


def test_kserve_clients_unchanged(srv):
    assert KSERVE_PY.exists(), f"{KSERVE_PY} is missing: run scripts/setup.sh (make setup), which makes it"
    png = digit_pngs(1)[0]
    run = subprocess.run([str(KSERVE_PY), "-c", CLIENT, srv.grpc_url, srv.url, KEY], input=png.hex(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["no_key"] == "UNAUTHENTICATED" and got["unknown_model"] == "NOT_FOUND"
    # The same tensors over REST give the same numbers.
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": list(range(64))}],
            "outputs": [{"name": "logits"}]}
    rest = httpx.post(srv.url + "/v2/models/digits/infer", json=body, headers=AUTH).json()
    np.testing.assert_allclose(got["uint8_logits"], rest["outputs"][0]["data"], atol=1e-6)
    assert got["rest_model_ready"]
    np.testing.assert_allclose(got["rest_uint8_logits"], rest["outputs"][0]["data"], atol=1e-6)
    assert got["model_version"] == rest["model_version"]
    r = httpx.post(srv.url + "/classify", files={"image": ("d.png", png, "image/png")}, data={"top_k": "10"},
                   headers=AUTH).json()
    probs = np.zeros(10)
    for p in r["predictions"]:
        probs[p["index"]] = p["score"]
    np.testing.assert_allclose(got["probabilities"], probs, atol=1e-5)
