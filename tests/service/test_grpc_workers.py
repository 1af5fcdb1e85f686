"""IMGSERVE_WORKERS=2: each worker process runs its own gRPC server on the same port (grpc sets
SO_REUSEPORT), and the kernel spreads new connections over both. Checked on a real ``bentoml serve``:
connections from separate clients all answer, and the server ends of those connections belong to
two different worker processes (read from /proc, as ``ss -tnp`` does).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import grpc
import pytest

from service.oip_grpc_gen import grpc_service_pb2 as pb
from svc_factory import start_grpc_service

CLIENTS = 16


@pytest.fixture(scope="module")
def srv(bundle, tmp_path_factory):
    s = start_grpc_service({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_WORKERS": "2"}, tmp_path_factory.mktemp("w2"))
    yield s
    s.stop()


def _socket_owners(pids: list[int]) -> dict[int, int]:
    """socket inode -> pid, for the sockets the processes ``pids`` hold open."""
    owners = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if m:
                    owners[int(m.group(1))] = pid
        except (FileNotFoundError, PermissionError):
            continue
    return owners


def _serving_pids(port: int, pids: list[int]) -> set[int]:
    """The processes holding the server end of established TCP connections on ``port``."""
    owners, found = _socket_owners(pids), set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port and int(f[9]) in owners:  # 01: ESTABLISHED
                found.add(owners[int(f[9])])
    return found


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
