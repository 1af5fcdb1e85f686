"""Closed-loop gRPC load with h2load (nghttp2's HTTP/2 benchmark, C, as wrk is for HTTP/1.1).

A gRPC unary call is an HTTP/2 POST of one length-prefixed message with ``content-type:
application/grpc``; h2load sends a prebuilt one on C connections, one call in flight each (-m 1),
for a fixed time. h2load sees HTTP statuses only, and a gRPC error is an HTTP 200 with a
``grpc-status`` trailer, so the outcome of every call is read from the server's own counter
(``imgserve_grpc_requests_total`` by status code, service/grpc_metrics.py) around the run; the
latencies and the call count come from h2load's per-request log. Results are ``loadtests.bench.WrkResult`` rows, as
wrk's, so REST and gRPC points print in one table.

Streaming (``stream_messages=N``): each h2load request is one ``ModelStreamInfer`` stream whose body is
N framed copies of the message, sent at once, so N messages are in flight per client (the server
answers up to 32 of a stream at once, service/grpc_stream.py). Throughput counts messages; p50/p99
are those of whole streams (the time to the last of its N answers), an upper bound of a message's.
"""
from __future__ import annotations

import logging
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from loadtests.bench import SETTLE_S, WrkResult, scrape
from service import launcher

log = logging.getLogger(__name__)
METHOD, STREAM_METHOD = "ModelInfer", "ModelStreamInfer"
PATH = f"/inference.GRPCInferenceService/{METHOD}"
STREAM_PATH = f"/inference.GRPCInferenceService/{STREAM_METHOD}"


def frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: not compressed (0), 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def calls(metrics_text: str, method: str = METHOD) -> dict[str, float]:
    """status code name -> calls of ``method`` so far."""
    rx = rf'^imgserve_grpc_requests_total\{{code="(\w+)",method="{method}"\}} (\S+)$'
    return {code: float(n) for code, n in re.findall(rx, metrics_text, re.M)}


def _percentile_ms(us: list[int], q: float) -> float | None:
    if not us:
        return None
    return statistics.quantiles(us, n=100, method="inclusive")[int(q) - 1] / 1e3 if len(us) > 1 else us[0] / 1e3


def run_h2load(grpc_url: str, body: Path, concurrency: int, duration_s: int, headers: dict[str, str],
               log_file: Path, path: str = PATH) -> str:
    cmd = ["h2load", "-t1", f"-c{concurrency}", "-m1", f"-D{duration_s}", "--warm-up-time=1", "-d", str(body),
           "-H", "content-type: application/grpc", "-H", "te: trailers", f"--log-file={log_file}",
           *[a for k, v in headers.items() for a in ("-H", f"{k}: {v}")], f"http://{grpc_url}{path}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    if p.returncode != 0:
        raise RuntimeError(f"h2load failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-300:]}")
    return p.stdout


def measure(server: launcher.Server, grpc_url: str, message: bytes, concs: list[int], duration_s: int,
            headers: dict[str, str] | None = None, stream_messages: int = 0) -> list[WrkResult]:
    """h2load at each concurrency; the server's CPU and its gRPC call counter read around each run.
    ``stream_messages`` > 0: ModelStreamInfer streams of that many messages instead of unary calls."""
    method, path = (STREAM_METHOD, STREAM_PATH) if stream_messages else (METHOD, PATH)
    per_call = stream_messages or 1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "call.grpc"
        body.write_bytes(frame(message) * per_call)
        for c in concs:
            time.sleep(SETTLE_S)
            before, cpu0 = calls(scrape(server.url), method), launcher.cpu_seconds(server.pids())
            out = run_h2load(grpc_url, body, c, duration_s, headers or {}, Path(tmp) / "log.tsv", path)
            cpu1 = launcher.cpu_seconds(server.pids())
            time.sleep(0.5)  # the calls h2load cut off at the end are answered and counted
            after = calls(scrape(server.url), method)
            # log: start (us), HTTP status, duration (us) of each call in the measured time (not the
            # warm-up's); the server's counter tells which of them failed (warm-up failures count too).
            us = sorted(int(line.split("\t")[2]) for line in (Path(tmp) / "log.tsv").read_text().splitlines() if line)
            # CANCELLED: the calls in flight when h2load stops (at most one per connection), not failures.
            failed = {code: int(after[code] - before.get(code, 0)) for code in after if code not in ("OK", "CANCELLED")}
            failed = {code: n for code, n in failed.items() if n}
            statuses = {"200": max(len(us) * per_call - sum(failed.values()), 0), **failed}
            m = re.search(r"(\d+) errored, (\d+) timeout", out)
            sock = int(m.group(1)) + int(m.group(2)) if m else 0
            r = WrkResult(c, float(duration_s), sum(statuses.values()), statuses, _percentile_ms(us, 50),
                          _percentile_ms(us, 99), sock, cpu_s=cpu1 - cpu0)
            log.info("gRPC %s c=%-3d %7.1f ok calls/s  p50 %7.1f ms  p99 %7.1f ms  errors %d", method, c, r.ok_rps,
                     r.p50_ms or 0, r.p99_ms or 0, r.errors)
            results.append(r)
    return results
