"""IMGSERVE_WORKERS=2: each worker process runs its own gRPC server on the same port (grpc sets
SO_REUSEPORT), and the kernel spreads new connections over both. Checked on a real ``bentoml serve``:
connections from separate clients all answer, and the server ends of those connections belong to
two different worker processes (as ``ss -tnp`` shows them).
"""
from __future__ import annotations

import time

import grpc
import pytest

from service.oip_grpc_gen import grpc_service_pb2 as pb
from svc_factory import established_on, start_grpc_service

CLIENTS = 16


@pytest.fixture(scope="module")
def srv(bundle, tmp_path_factory):
    s = start_grpc_service({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_WORKERS": "2"}, tmp_path_factory.mktemp("w2"))
    yield s
    s.stop()


def _serving_pids(port: int, pids: list[int]) -> set[int]:
    """The processes holding the server end of established TCP connections on ``port``."""
    return {pid for pid in pids if established_on(pid, port)}


def test_both_workers_serve_grpc_on_one_port(srv):
    port = int(srv.grpc_url.rsplit(":", 1)[1])
    msg = pb.ModelInferRequest(model_name="digits", raw_input_contents=[bytes(64)], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 8, 8, 1])]).SerializeToString()
    deadline = time.monotonic() + 60
    while True:  # the second worker may still be starting: new connections until both answer
        # A private subchannel pool per channel: otherwise grpc shares one connection between them.
        chans = [grpc.insecure_channel(srv.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(CLIENTS)]
        try:
            for ch in chans:
                answer = pb.ModelInferResponse.FromString(
                    ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(msg, timeout=30))
                assert answer.model_name == "digits" and answer.outputs
            serving = _serving_pids(port, srv.pids())
        finally:
            for ch in chans:
                ch.close()
        if len(serving) == 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(serving) == 2, f"connections served by {serving} only"
