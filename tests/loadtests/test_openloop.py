"""The open-loop generator does not wait for the server: against a one-at-a-time server with a known
service time, offered twice its capacity, latency grows linearly with time at the predicted slope.

A closed loop (or an open loop that measured from the send time after waiting) would show flat
latency here; this is the coordinated-omission check issue 27 asks for.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

from loadtests.openloop import run_steps, summarize
from loadtests.soak import raw_post
from service.launcher import free_port

SERVICE_S = 0.02  # capacity 50 req/s, one request at a time

# A tiny HTTP server: reads a whole request, then holds one lock while it sleeps SERVICE_S.
SERVER = """
import asyncio, sys
lock = asyncio.Lock()
async def handle(r, w):
    try:
        head = await r.readuntil(b"\\r\\n\\r\\n")
    except asyncio.IncompleteReadError:  # the readiness probe connects and leaves
        return w.close()
    n = [int(l.split(b":")[1]) for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")]
    await r.readexactly(n[0] if n else 0)
    async with lock:
        await asyncio.sleep(%s)
    w.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
    await w.drain(); w.close()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with s: await s.serve_forever()
asyncio.run(main())
""" % SERVICE_S


def _wait_listening(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the sleep server did not start")


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def test_latency_grows_linearly_at_twice_capacity() -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        _wait_listening(port)
        cap = 1 / SERVICE_S
        req = raw_post("/", b"x" * 100, "application/octet-stream")
        # Two steps: 0.5x (no queue), then 2x for 3 s; recovery phase at 0.5x.
        stats, _ = asyncio.run(run_steps(f"http://127.0.0.1:{port}/", req, cap, [0.5, 2.0], 3.0, 10.0, 1.0,
                                         timeout=30.0, max_outstanding=1000))
    finally:
        server.terminate()
        server.wait(10)
    calm, over = stats[0], stats[1]
    assert calm.outcomes == {"200": calm.sent} and over.outcomes == {"200": over.sent}
    assert calm.sent == 75 and over.sent == 300, "arrivals follow the schedule, not the answers"
    assert calm.p50_ms < 10 * SERVICE_S * 1000
    # At 2x, the backlog grows by one second of work per second offered, so the last arrival (after
    # 3 s) waits about 3 s; a generator that waited for answers would stay near one service time.
    assert over.p99_ms > 2000, over


def test_slope_from_due_times() -> None:
    """The slope itself, from the shots: run one 2x step and fit latency against due time."""
    from loadtests.openloop import offer

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        _wait_listening(port)
        req = raw_post("/", b"x" * 100, "application/octet-stream")

        async def go():
            shots, open_ = await offer("127.0.0.1", port, req, 2 / SERVICE_S, 2.0, time.perf_counter(), 30.0, 1000)
            await asyncio.gather(*open_)
            return shots

        shots = asyncio.run(go())
    finally:
        server.terminate()
        server.wait(10)
    assert len(shots) == 200 and all(s.outcome == "200" for s in shots)
    slope = _slope([s.due for s in shots], [s.latency for s in shots])
    # Offered rate / service rate - 1 = 1 s of latency per second; a busy machine slows the server
    # (steeper slope), it never flattens it.
    assert 0.8 < slope < 1.8, slope
    assert summarize("2x", 100, 2.0, shots, 0.1).ok_late > 100
