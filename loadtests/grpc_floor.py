"""The transport floors behind docs/protocol.md's gRPC speed: what one call costs each Python server
stack with the model taken out, in one run.

    .venv/bin/python -m loadtests.grpc_floor --concurrency 1,8,32 --duration 6 --server-cpus 1 --client-cpus 0

Every floor answers the small model's question (784 bytes of UINT8 pixels in, 10 float32 logits
out) with a fixed reply, without a model:

  rest       uvicorn + httptools on uvloop, the HTTP stack under ``bentoml serve``: a POST of the raw
             pixels, 40 bytes back
  grpc-aio   grpcio's asyncio server, the stack of service/grpc_oip.py: ``ModelInfer`` parses the
             ``ModelInferRequest`` and returns a ``ModelInferResponse`` (raw output contents)
  grpc-sync  grpcio's thread-pool server, the same handler
  grpclib    grpclib (HTTP/2 in Python on asyncio), the same handler; skipped when not installed

One load generator for all: h2load (HTTP/1.1 with ``--h1`` for rest), one thread, C connections
with one call in flight each. Prints calls/s and the server's CPU milliseconds per call (/proc):
a server stack's per-call CPU is the least any model served through it can cost per request.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from loadtests.grpc_load import PATH, frame
from service import launcher
from service.oip_grpc_gen import grpc_service_pb2 as pb
from service.oip_grpc_gen import grpc_service_pb2_grpc as pb_grpc

PIXELS = np.zeros((1, 28, 28, 1), np.uint8)
LOGITS = np.zeros((1, 10), np.float32).tobytes()


def request_message() -> bytes:
    req = pb.ModelInferRequest(model_name="fm28")
    req.inputs.add(name="pixels", datatype="UINT8", shape=list(PIXELS.shape))
    req.raw_input_contents.append(PIXELS.tobytes())
    return req.SerializeToString()


def answer(req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """What a handler must do at least: read the tensor, build the reply."""
    np.frombuffer(req.raw_input_contents[0], np.uint8)
    reply = pb.ModelInferResponse(model_name=req.model_name, id=req.id)
    reply.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    reply.raw_output_contents.append(LOGITS)
    return reply


# -- the floors: each serves on 127.0.0.1:port until killed ---------------------------------------
def serve_rest(port: int) -> None:
    import uvicorn

    async def app(scope, receive, send):  # noqa: ANN001 (ASGI)
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        await send({"type": "http.response.body", "body": LOGITS})

    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop", log_level="warning",
                access_log=False)


class _AioServicer(pb_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):  # noqa: N802, ANN001 (generated names)
        return answer(request)


def serve_grpc_aio(port: int) -> None:
    import grpc

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_AioServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


class _SyncServicer(pb_grpc.GRPCInferenceServiceServicer):
    def ModelInfer(self, request, context):  # noqa: N802, ANN001
        return answer(request)


def serve_grpc_sync(port: int) -> None:
    from concurrent import futures

    import grpc
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_SyncServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_grpclib(port: int) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    class Servicer:
        async def model_infer(self, stream) -> None:  # noqa: ANN001
            await stream.send_message(answer(await stream.recv_message()))

        def __mapping__(self) -> dict:
            return {PATH: Handler(self.model_infer, Cardinality.UNARY_UNARY, pb.ModelInferRequest,
                                  pb.ModelInferResponse)}

    async def run() -> None:
        server = Server([Servicer()])
        await server.start("127.0.0.1", port)
        await server.wait_closed()

    asyncio.run(run())


def _has_grpclib() -> bool:
    try:
        import grpclib  # noqa: F401
    except ImportError:
        return False
    return True


FLOORS: dict[str, tuple[Callable[[int], None], Callable[[], bool]]] = {
    "rest": (serve_rest, lambda: True),
    "grpc-aio": (serve_grpc_aio, lambda: True),
    "grpc-sync": (serve_grpc_sync, lambda: True),
    "grpclib": (serve_grpclib, _has_grpclib),
}


# -- measuring ----------------------------------------------------------------------------------
def _pinned(cpus: str | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the floor server exited ({proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")


def h2load(kind: str, port: int, body: Path, concurrency: int, duration_s: int, client_cpus: str | None) -> int:
    """Calls answered (2xx) in ``duration_s`` after a 1 s warm-up."""
    rest = kind == "rest"
    headers = ["content-type: application/octet-stream"] if rest else ["content-type: application/grpc",
                                                                          "te: trailers"]
    cmd = ["h2load", *(["--h1"] if rest else []), "-t1", f"-c{concurrency}", "-m1", f"-D{duration_s}",
           "--warm-up-time=1", "-d", str(body), *[a for h in headers for a in ("-H", h)],
           f"http://127.0.0.1:{port}{'/' if rest else PATH}"]
    p = subprocess.run(_pinned(client_cpus, cmd), capture_output=True, text=True, timeout=duration_s + 60)
    m = re.search(r"status codes: (\d+) 2xx", p.stdout)
    if p.returncode != 0 or m is None:
        raise RuntimeError(f"h2load failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-300:]}")
    return int(m.group(1))


def measure(kind: str, concs: list[int], duration_s: int, server_cpus: str | None,
            client_cpus: str | None) -> list[tuple[int, float, float]]:
    """(concurrency, calls/s, server CPU ms per call) at each concurrency."""
    port = launcher.free_port()
    proc = subprocess.Popen(_pinned(server_cpus, [sys.executable, "-m", "loadtests.grpc_floor", "--serve", kind,
                                                  "--port", str(port)]))
    rows = []
    try:
        wait_listening(port, proc)
        with tempfile.TemporaryDirectory() as tmp:
            body = Path(tmp) / "body"
            body.write_bytes(PIXELS.tobytes() if kind == "rest" else frame(request_message()))
            h2load(kind, port, body, 1, 1, client_cpus)  # warm every path once
            for c in concs:
                cpu0 = launcher.cpu_seconds([proc.pid])
                n = h2load(kind, port, body, c, duration_s, client_cpus)
                cpu = launcher.cpu_seconds([proc.pid]) - cpu0  # includes the 1 s warm-up's calls: an upper bound
                rows.append((c, n / duration_s, 1e3 * cpu / max(n, 1)))
    finally:
        proc.kill()
        proc.wait()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--floors", default=",".join(FLOORS), help="comma-separated, of: " + ", ".join(FLOORS))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=int, default=6, help="seconds per point")
    ap.add_argument("--server-cpus", help="taskset list for the servers (e.g. 1)")
    ap.add_argument("--client-cpus", help="taskset list for h2load (e.g. 0)")
    ap.add_argument("--serve", choices=FLOORS, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        FLOORS[args.serve][0](args.port)
        return
    concs = [int(c) for c in args.concurrency.split(",")]
    print("| floor | clients | calls/s | server CPU ms/call |\n|---|---|---|---|")
    for kind in args.floors.split(","):
        if not FLOORS[kind][1]():
            print(f"| {kind} | - | not installed | - |")
            continue
        for c, rps, cpu_ms in measure(kind, concs, args.duration, args.server_cpus, args.client_cpus):
            print(f"| {kind} | {c} | {rps:.0f} | {cpu_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
