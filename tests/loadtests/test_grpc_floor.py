"""loadtests/grpc_floor.py, small: each floor server really answers the small model's question
(h2load counts only 2xx, and a gRPC reply that h2load reads as 2xx is checked here with a real
gRPC client), and the table has one row per floor and concurrency with calls and CPU."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import grpc
import numpy as np

from loadtests import grpc_floor
from service import launcher
from service.oip_grpc_gen import grpc_service_pb2 as pb
from service.oip_grpc_gen import grpc_service_pb2_grpc as pb_grpc


def test_the_grpc_floor_answers_a_real_client_with_the_fixed_reply() -> None:
    port = launcher.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.grpc_floor", "--serve", "grpc-aio",
                             "--port", str(port)])
    try:
        grpc_floor.wait_listening(port, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            reply = stub.ModelInfer(pb.ModelInferRequest.FromString(grpc_floor.request_message()), timeout=10)
        assert reply.model_name == "fm28" and list(reply.outputs[0].shape) == [1, 10]
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).shape == (10,)
    finally:
        proc.kill()
        proc.wait()


def test_the_table_has_a_row_per_floor_and_concurrency() -> None:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "loadtests.grpc_floor", "--floors", "rest,grpc-aio,grpc-sync",
                        "--concurrency", "1,4", "--duration", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = re.findall(r"^\| ([\w-]+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", p.stdout, re.M)
    assert [(kind, int(c)) for kind, c, _, _ in rows] == [
        ("rest", 1), ("rest", 4), ("grpc-aio", 1), ("grpc-aio", 4), ("grpc-sync", 1), ("grpc-sync", 4)], p.stdout
    assert all(int(calls) > 50 and 0 < float(cpu) < 20 for _, _, calls, cpu in rows), p.stdout
    print(f"\n{p.stdout}({time.monotonic() - t0:.0f} s)")
