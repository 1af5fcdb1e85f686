"""The open-loop generator does not wait for the server: against a one-at-a-time server with a known
service time, offered twice its capacity, latency grows linearly with time at the predicted slope.

A closed loop (or an open loop that measured from the send time after waiting) would show flat
latency here; this is the coordinated-omission check issue 27 asks for. Every engine
(loadtests.openloop.ENGINES) meets the same checks; vegeta's are skipped where its binary is
absent (scripts/get_vegeta.sh needs the Go module proxy; tests never use the network).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from loadtests.openloop import ENGINES, Phase, Shot, measure_capacity, run_steps, summarize
from loadtests.openloop_vegeta import vegeta_binary
from loadtests.soak import raw_post
from service.launcher import free_port

NO_VEGETA = pytest.mark.skipif(vegeta_binary() is None, reason="no vegeta binary (scripts/get_vegeta.sh needs "
                                                               "the Go module proxy; or set VEGETA=/path/to/vegeta)")
ENGINE_PARAMS = [pytest.param(name, marks=[NO_VEGETA] if name.startswith("vegeta") else [])
                 for name in ENGINES.names()]

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
        await asyncio.sleep(%r)
    w.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
    await w.drain(); w.close()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with s: await s.serve_forever()
asyncio.run(main())
"""


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30  # a Python start takes seconds when the shared machine is busy
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the sleep server did not start within 30 s")


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _serve(service_s: float = SERVICE_S):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER % service_s, str(port)])
    _wait_listening(port)
    return port, server


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(10)


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_latency_grows_linearly_at_twice_capacity(engine: str) -> None:
    port, server = _serve()
    try:
        cap = 1 / SERVICE_S
        req = raw_post("/", b"x" * 100, "application/octet-stream")
        # Two steps: 0.5x (no queue), then 2x for 3 s; recovery phase at 0.5x.
        stats, _ = run_steps(f"http://127.0.0.1:{port}/", req, cap, [0.5, 2.0], 3.0, 10.0, 1.0,
                             timeout=30.0, max_outstanding=1000, engine=engine)
    finally:
        _stop(server)
    calm, over = stats[0], stats[1]
    assert calm.outcomes == {"200": calm.sent} and over.outcomes == {"200": over.sent}
    assert calm.sent == 75 and over.sent == 300, "arrivals follow the schedule, not the answers"
    assert calm.p50_ms < 10 * SERVICE_S * 1000
    # At 2x, the backlog grows by one second of work per second offered, so the last arrival (after
    # 3 s) waits about 3 s; a generator that waited for answers would stay near one service time.
    assert over.p99_ms > 2000, over
    # The generator kept its schedule: it sent at the offered rate, however slow the answers.
    assert abs(over.achieved_rate / over.rate - 1) < 0.05, over


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_slope_from_due_times(engine: str) -> None:
    """The slope itself, from the shots: run one 2x step and fit latency against due time."""
    port, server = _serve()
    try:
        req = raw_post("/", b"x" * 100, "application/octet-stream")
        phase = Phase("2x", 2 / SERVICE_S, 2.0, 0.0)
        [shots] = ENGINES.get(engine).offer(f"http://127.0.0.1:{port}/", req, [phase], 30.0, 1000)
    finally:
        _stop(server)
    assert len(shots) == 200 and all(s.outcome == "200" for s in shots)
    slope = _slope([s.due for s in shots], [s.latency for s in shots])
    # Offered rate / service rate - 1 = 1 s of latency per second; a busy machine slows the server
    # (steeper slope), it never flattens it.
    assert 0.8 < slope < 1.8, slope
    assert summarize(phase, shots, 0.1).ok_late > 100


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_achieved_rate_at_a_sustainable_rate(engine: str) -> None:
    """Below the server's capacity and well within the generator's reach, every arrival is sent on
    time: achieved ~= offered, client lag small, latency one service time."""
    port, server = _serve(0.0)
    try:
        req = raw_post("/", b"x" * 100, "application/octet-stream")
        phase = Phase("calm", 200.0, 2.0, 0.0)
        [shots] = ENGINES.get(engine).offer(f"http://127.0.0.1:{port}/", req, [phase], 10.0, 1000)
    finally:
        _stop(server)
    step = summarize(phase, shots, 1.0)
    assert step.outcomes == {"200": 400}, step
    assert abs(step.achieved_rate / 200 - 1) < 0.03, step
    # Generous bounds: on a busy 2-core machine a scheduler hiccup costs tens of ms; a latency not
    # counted from the due time, or a generator that fell behind, shows up as seconds.
    assert step.lag_p99_ms < 250 and step.p50_ms < 250, step


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_capacity_of_a_known_server(engine: str) -> None:
    """The capacity the steps multiply, from the engine's own closed loop: one request at a time
    for SERVICE_S each is 1 / SERVICE_S req/s, whatever the concurrency."""
    port, server = _serve()
    try:
        req = raw_post("/", b"x" * 100, "application/octet-stream")
        cap = measure_capacity(f"http://127.0.0.1:{port}/", req, concurrency=4, seconds=2.0, engine=engine)
    finally:
        _stop(server)
    assert 0.75 / SERVICE_S < cap <= 1.05 / SERVICE_S, cap


def test_an_overloaded_generator_shows_in_the_row() -> None:
    """Arrivals a generator never sent and sends that came late lower the achieved rate (what the
    row's 'sent req/s' column shows) instead of vanishing."""
    phase = Phase("4x", 100.0, 1.0, 0.0)
    on_time = [Shot(i / 100, 0.01, 0.0, "200") for i in range(100)]
    assert summarize(phase, on_time, 1.0).achieved_rate == pytest.approx(100, rel=0.02)
    late = [Shot(i / 100, 0.01 + i / 100, i / 100, "200") for i in range(100)]  # each 2x later than due
    assert summarize(phase, late, 1.0).achieved_rate == pytest.approx(50, rel=0.02)
    half_unsent = on_time[:50] + [Shot(s.due, float("inf"), float("inf"), "client_unsent") for s in on_time[50:]]
    step = summarize(phase, half_unsent, 1.0)
    assert step.achieved_rate == pytest.approx(50, rel=0.03) and step.outcomes["client_unsent"] == 50
    assert step.goodput == 50 and step.lag_p99_ms == 0.0
