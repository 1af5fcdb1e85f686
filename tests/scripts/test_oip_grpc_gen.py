"""The committed gRPC code (service/oip_grpc_gen/) is what scripts/oip_grpc_gen.py generates now from
the installed tritonclient and grpcio-tools: a re-run gives the same files, byte for byte."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "service" / "oip_grpc_gen"


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "oip_grpc_gen.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"service/oip_grpc_gen is stale ({stale}): run scripts/oip_grpc_gen.py and commit"


def test_generated_messages_are_tritonclients() -> None:
    """Same descriptors as the client library: a process may load both (tests, benchmarks)."""
    from tritonclient.grpc import service_pb2

    from service.oip_grpc_gen import grpc_service_pb2

    assert grpc_service_pb2.DESCRIPTOR.serialized_pb == service_pb2.DESCRIPTOR.serialized_pb
    assert grpc_service_pb2.ModelInferRequest is service_pb2.ModelInferRequest
