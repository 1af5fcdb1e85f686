"""The vegeta engine of loadtests.openloop: each step is one ``vegeta attack`` at the step's rate.

vegeta (a Go load generator, ``scripts/get_vegeta.sh`` installs it into build/bin/) is a well-kept
open-loop generator; with fresh connections it costs the client about the CPU per request of the
python engine, with ``-keepalive`` about a third less (docs/loadtests.md). It gets the same
raw request as the python engine (method, path, headers, multipart body, ``Connection: close``:
a fresh connection per request), and its per-request results (``vegeta encode -to csv``) become
the same ``Shot`` records, so the statistics are loadtests.openloop's own.

How vegeta paces, and what that means for the figures (read from its lib/attack.go and lib/pacer.go):

- Its constant pacer schedules hit k (from 0) at ``began + (k+1) * interval``; one goroutine ticks
  and a pool of workers sends, a new worker started whenever all are busy (up to -max-workers), so
  a slow server gets more requests in flight, not fewer arrivals (open loop).
- When it falls behind it sends the missed hits at once (catch-up), and it stops at -duration
  whatever it has sent: arrivals it never sent are counted here as ``client_unsent``.
- Its latency runs from the moment a worker took the hit, not from the hit's scheduled time, and
  its timestamp is that moment. So this module recomputes each latency from the *due* time, as
  the python engine does: due = began + (seq+1) * interval, the lag is timestamp - due, the
  latency is lag + vegeta's latency. A late generator adds its lag instead of hiding it.
- ``began`` (when the process started its schedule) is not in the results: it is the earliest
  ``timestamp - (seq+1) * interval`` (no hit is sent early, and the first ones are on time). Like
  the python engine's steps, the schedule counts from when the step's generator actually started.
"""
from __future__ import annotations

import base64
import csv
import io
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from loadtests.openloop import Phase, Shot
from loadtests.soak import split_url

REPO = Path(__file__).resolve().parent.parent
# One core for the generator, as the python engine's one event loop, unless GOMAXPROCS says
# otherwise: on a 2-core machine a generator on both cores takes the server's CPU.
ENV = {**os.environ, "GOMAXPROCS": os.environ.get("GOMAXPROCS", "1")}
# Headers Go's HTTP client writes itself (Connection: close comes from -keepalive=false).
OWN_HEADERS = {"host", "connection", "content-length"}
# vegeta's error text (Go's net/http) -> the python engine's outcome names, first match wins.
ERRORS = (
    ("Client.Timeout", "timeout"),
    ("deadline exceeded", "timeout"),
    ("i/o timeout", "timeout"),
    ("connection reset by peer", "ConnectionResetError"),
    ("connection refused", "ConnectionRefusedError"),
    ("broken pipe", "BrokenPipeError"),
    ("EOF", "IncompleteReadError"),  # the server closed before a whole answer
    ("cannot assign requested address", "OSError"),  # out of local ports
    ("too many open files", "OSError"),
)


def vegeta_binary() -> str | None:
    """$VEGETA, else build/bin/vegeta of this checkout (scripts/get_vegeta.sh), else vegeta on PATH."""
    for candidate in (os.environ.get("VEGETA"), str(REPO / "build" / "bin" / "vegeta")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("vegeta")


def target(url: str, request: bytes) -> dict:
    """vegeta's JSON target for a raw HTTP/1.1 request as the python engine sends it (loopback only)."""
    host, port = split_url(url)
    if host != "localhost" and not ipaddress.ip_address(host.strip("[]")).is_loopback:
        raise ValueError(f"open-loop targets are loopback addresses only, not {host!r}")
    head, body = request.split(b"\r\n\r\n", 1)
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    header: dict[str, list[str]] = {}
    for line in lines:
        k, v = line.split(":", 1)
        if k.strip().lower() not in OWN_HEADERS:
            header.setdefault(k.strip(), []).append(v.strip())
    return {"method": method, "url": f"http://{host}:{port}{path}", "header": header,
            "body": base64.b64encode(body).decode()}


class Attack:
    """One ``vegeta attack`` of the request, bounded in time, its results decoded afterwards."""

    def __init__(self, vegeta: str, targets: Path, out: Path, seconds: float, timeout: float, keepalive: bool,
                 *pacing: str) -> None:
        span = f"{round(seconds * 1e6)}us"
        # coreutils timeout bounds it even if this process dies: vegeta stops at -duration, then
        # waits at most -timeout for the last answers.
        self.vegeta, self.out = vegeta, out
        self.proc = subprocess.Popen(
            ["timeout", "-k", "5", f"{seconds + timeout + 30:.0f}", vegeta, "attack", "-format=json",
             f"-targets={targets}", f"-duration={span}", f"-timeout={timeout:g}s",
             f"-keepalive={str(keepalive).lower()}", "-http2=false", "-max-body=0", f"-output={out}", *pacing],
            env=ENV, stderr=subprocess.PIPE)

    def rows(self) -> list[list[str]]:
        """Wait for the attack to end; its results as CSV rows (see shots_from_csv)."""
        _, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"vegeta attack failed ({self.proc.returncode}): {err.decode()[-500:]}")
        encoded = subprocess.run([self.vegeta, "encode", "-to=csv", str(self.out)], capture_output=True,
                                 check=True, timeout=120).stdout.decode()
        return list(csv.reader(io.StringIO(encoded)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def outcome(code: int, error: str) -> str:
    if code:
        return str(code)
    return next((name for text, name in ERRORS if text in error), f"error: {error[-60:]}")


def shots_from_csv(rows: Sequence[list[str]], phase: Phase, run_wall_start: float) -> list[Shot]:
    """vegeta's CSV results (timestamp ns, code, latency ns, bytes out, bytes in, error, body, attack,
    seq, ...) -> shots with latency from each hit's due time; hits never sent -> client_unsent."""
    interval = phase.seconds / phase.count
    sent = [(int(r[8]), int(r[0]) / 1e9, int(r[2]) / 1e9, outcome(int(r[1]), r[5])) for r in rows
            if int(r[8]) < phase.count]
    began = min((ts - (seq + 1) * interval for seq, ts, _, _ in sent), default=run_wall_start + phase.start)
    shots = []
    for seq, ts, latency, what in sent:
        due = began + (seq + 1) * interval
        shots.append(Shot(due - run_wall_start, ts - due + latency, ts - due, what))
    for seq in sorted(set(range(phase.count)) - {seq for seq, *_ in sent}):
        shots.append(Shot(began + (seq + 1) * interval - run_wall_start, float("inf"), float("inf"),
                          "client_unsent"))
    return shots


def _vegeta_and_targets(url: str, request: bytes) -> tuple[str, Path]:
    vegeta = vegeta_binary()
    if vegeta is None:
        raise FileNotFoundError("vegeta not found: run scripts/get_vegeta.sh (or set VEGETA=/path/to/vegeta)")
    work = Path(tempfile.mkdtemp(prefix="openloop-vegeta-"))
    (work / "targets.json").write_text(json.dumps(target(url, request)) + "\n")
    return vegeta, work


def run_phases(url: str, request: bytes, phases: Sequence[Phase], timeout: float, max_outstanding: int,
               keepalive: bool = False) -> list[list[Shot]]:
    """Start each step's vegeta at its planned time, whether or not the previous one has finished
    waiting for its last answers (arrivals do not wait), then read every step's results.

    ``keepalive``: reuse connections (vegeta opens more whenever all are busy, so it stays an open
    loop) instead of the python engine's fresh connection per request."""
    vegeta, work = _vegeta_and_targets(url, request)
    run_wall_start = time.time() + 0.2  # a moment to start the first process
    attacks: list[Attack] = []
    try:
        for i, ph in enumerate(phases):
            time.sleep(max(0.0, run_wall_start + ph.start - time.time()))
            # ph.count hits spread evenly over the step (rate = count per step), the last one due
            # at the step's end: -duration half an interval longer, or a last hit woken a little
            # late would be left unsent (vegeta checks -duration before it sleeps, so it may send
            # one hit more, which shots_from_csv leaves out).
            interval = ph.seconds / ph.count
            attacks.append(Attack(vegeta, work / "targets.json", work / f"step{i}.bin", ph.seconds + interval / 2,
                                  timeout, keepalive, f"-rate={ph.count}/{round(ph.seconds * 1000)}ms",
                                  f"-max-workers={max_outstanding}"))
        return [shots_from_csv(a.rows(), ph, run_wall_start) for a, ph in zip(attacks, phases)]
    finally:
        for a in attacks:  # only after an error: stop the attacks still running
            a.stop()
        shutil.rmtree(work, ignore_errors=True)


def closed_loop_capacity(url: str, request: bytes, concurrency: int, seconds: float, keepalive: bool) -> float:
    """2xx per second of ``concurrency`` vegeta workers sending back to back (-rate=0: a closed
    loop), after a 2 s warm-up: the capacity the steps multiply, measured with this engine's
    connections (keep-alive capacity is higher than fresh-connection capacity)."""
    vegeta, work = _vegeta_and_targets(url, request)
    warmup = 2.0
    attack = Attack(vegeta, work / "targets.json", work / "capacity.bin", warmup + seconds, 30.0, keepalive,
                    "-rate=0", f"-workers={concurrency}", f"-max-workers={concurrency}")
    try:
        rows = attack.rows()
    finally:
        attack.stop()
        shutil.rmtree(work, ignore_errors=True)
    t0 = min(int(r[0]) for r in rows) / 1e9 + warmup
    return sum(int(r[0]) / 1e9 >= t0 and r[1].startswith("2") for r in rows) / seconds
