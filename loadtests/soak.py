"""Soak test: N minutes at ~70 % of the measured capacity with mixed good and bad inputs.

    nice -n 5 timeout 900 .venv/bin/python -m loadtests.soak --bundle bundles/default --minutes 10

starts ``bentoml serve`` on a free 127.0.0.1 port (or use ``--url URL --server-pid PID`` for a running
one), measures the sustainable rate with a short closed loop, then offers an open-loop arrival rate
of ``--fraction`` x that rate for ``--minutes``; about ``--bad-share`` of the requests are bad inputs
(text, truncated PNG, decompression bomb, wrong field) that must get their documented 4xx.
Prints one line per minute (requests, status counts, p50/p99 of good requests, worker RSS) and a
summary: unexpected answers (anything but 200 with the right label for good inputs, or the
documented 4xx for bad ones; a 503 counts as shed, not unexpected), RSS growth % from the first
minute to the last, p99 drift. Exit status 1 when there were unexpected answers.

The async raw-socket client (``fire``, ``closed_loop``, ``open_loop``) is also what
tests/reliability uses: it costs the client far less CPU than httpx, so on a 2-core box the
server, not the client, is what saturates.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)

BOUNDARY = b"imgservSoakBoundary7d1e"


# -- requests ---------------------------------------------------------------------------------------
def multipart(parts: Sequence[tuple[str, Optional[bytes], bytes, Optional[str]]],
              boundary: bytes = BOUNDARY) -> tuple[bytes, str]:
    """(field, filename or None, data, content type or None) parts -> (body, Content-Type header).

    Filenames are raw bytes so tests can send names that are not UTF-8.
    """
    out = io.BytesIO()
    for name, filename, data, ctype in parts:
        out.write(b"--" + boundary + b"\r\n")
        disp = b'Content-Disposition: form-data; name="' + name.encode() + b'"'
        if filename is not None:
            disp += b'; filename="' + filename + b'"'
        out.write(disp + b"\r\n")
        if ctype:
            out.write(b"Content-Type: " + ctype.encode() + b"\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    out.write(b"--" + boundary + b"--\r\n")
    return out.getvalue(), "multipart/form-data; boundary=" + boundary.decode()


def raw_post(path: str, body: bytes, content_type: Optional[str], headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 POST (Connection: close) as bytes, sent as is by ``fire``."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(body)}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def image_post(data: bytes, *, field_name: str = "image", path: str = "/classify", filename: bytes = b"x.png",
               ctype: str = "image/png", form: dict[str, str] | None = None,
               headers: dict[str, str] | None = None) -> bytes:
    """One multipart upload of ``data`` as a raw request."""
    parts = [(field_name, filename, data, ctype)] + [(k, None, v.encode(), None) for k, v in (form or {}).items()]
    body, ct = multipart(parts)
    return raw_post(path, body, ct, headers)


@dataclass
class Result:
    """One request's outcome. ``status`` is None when no HTTP answer came (``error`` says why)."""

    started: float
    latency: float
    status: Optional[int] = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: Optional[str] = None
    tag: object = None  # what the caller sent (to check the answer)

    def json(self) -> dict:
        return json.loads(self.body)


async def fire(host: str, port: int, request: bytes, timeout: float = 30.0, tag: object = None) -> Result:
    """Send one raw request on a fresh connection and read the whole answer."""
    t0 = time.perf_counter()
    res = Result(started=t0, latency=0.0, tag=tag)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *hdrs = head.decode("latin-1").split("\r\n")
            res.status = int(status_line.split(" ", 2)[1])
            for h in hdrs:
                if ":" in h:
                    k, v = h.split(":", 1)
                    res.headers[k.strip().lower()] = v.strip()
            n = res.headers.get("content-length")
            if n is not None:
                res.body = await reader.readexactly(int(n))
            elif res.headers.get("transfer-encoding", "").lower() == "chunked":
                res.body = await _read_chunked(reader)
            else:
                res.body = await reader.read()
    except TimeoutError:
        res.error = "timeout"
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
        res.error = type(e).__name__
    finally:
        if writer is not None:
            writer.close()
    res.latency = time.perf_counter() - t0
    return res


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """Body of a chunked answer; a connection that dies before the last chunk raises
    IncompleteReadError, so a truncated answer counts as no answer, not as a wrong body."""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # end of (empty) trailers
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])


async def closed_loop(host: str, port: int, make: Callable[[int], tuple[bytes, object]], concurrency: int,
                      seconds: float, max_requests: int = 100_000, timeout: float = 30.0,
                      stop: Callable[[], bool] = lambda: False) -> list[Result]:
    """``concurrency`` clients, each sending its next request when the last one is answered.

    Ends after ``seconds``, ``max_requests`` or when ``stop()`` turns true, whichever comes first.
    """
    out: list[Result] = []
    end = time.perf_counter() + seconds
    counter = iter(range(max_requests))

    async def client() -> None:
        for i in counter:
            if time.perf_counter() >= end or stop():
                return
            req, tag = make(i)
            out.append(await fire(host, port, req, timeout, tag))
            if out[-1].status is None:
                await asyncio.sleep(0.01)  # refused or reset: do not spin on a server that is down

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return out


async def open_loop(host: str, port: int, make: Callable[[int], tuple[bytes, object]], rate: float,
                    seconds: float, timeout: float = 30.0, max_outstanding: int = 2000) -> list[Result]:
    """Arrivals at a fixed ``rate`` (req/s) for ``seconds``, whatever the answers do (open loop).

    Bounded in count (``rate * seconds``) and in time (``seconds + timeout``). Arrivals that would
    exceed ``max_outstanding`` open requests are recorded as error "client_backlog".
    """
    n = max(1, int(rate * seconds))
    t0 = time.perf_counter()
    tasks: list[asyncio.Task] = []
    dropped: list[Result] = []
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sum(not t.done() for t in tasks[-max_outstanding:]) >= max_outstanding:
            dropped.append(Result(time.perf_counter(), 0.0, error="client_backlog"))
            continue
        req, tag = make(i)
        tasks.append(asyncio.create_task(fire(host, port, req, timeout, tag)))
    return [*(await asyncio.gather(*tasks)), *dropped]


def capacity(host: str, port: int, make: Callable[[int], tuple[bytes, object]], seconds: float = 4.0,
             concurrency: int = 8) -> float:
    """Sustainable throughput (answers 200 per second) from a short closed loop after a 1 s warm-up."""
    asyncio.run(closed_loop(host, port, make, concurrency, 1.0))
    t0 = time.perf_counter()
    rs = asyncio.run(closed_loop(host, port, make, concurrency, seconds))
    return sum(r.status == 200 for r in rs) / (time.perf_counter() - t0)


def pct(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of xs, nearest rank; nan for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def rss_kib(pid: int) -> int:
    """VmRSS of a process from /proc/PID/status, KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def worker_pids(server_pid: int) -> list[int]:
    """BentoML's worker processes under a ``bentoml serve`` process (they setsid, so look by parent)."""
    from service.launcher import tree_pids

    return [p for p in tree_pids(server_pid) if p != server_pid]


# -- the soak's inputs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A request and what a correct answer is: status and, for 200, the expected top-1 label."""

    name: str
    request: bytes
    status: int
    label: Optional[str] = None


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bad_cases(good_png: bytes, headers: dict[str, str] | None = None) -> list[Case]:
    """Bad inputs with their documented status (README error table)."""
    import struct

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)  # 2.5 Gpx declared in a tiny file
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return [Case("text", image_post(b"hello, not an image", headers=headers), 400),
            Case("truncated_png", image_post(good_png[: len(good_png) // 2], headers=headers), 400),
            Case("bomb_png", image_post(bomb, headers=headers), 413),
            Case("wrong_field", image_post(good_png, field_name="picture", headers=headers), 400)]


def good_cases(url: str, n: int = 32, headers: dict[str, str] | None = None, side: int = 28) -> list[Case]:
    """Held-out digits as ``side`` px PNGs, each with the label the idle server gives it (checked under load).

    A big ``side`` makes decoding, not HTTP, the per-request cost, as with real photo uploads.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    host, port = split_url(url)
    cases = []
    for i in range(n):
        a = (d.images[-1 - i] * (255 / 16)).astype("uint8")
        req = image_post(_png(Image.fromarray(a, "L").resize((side, side), Image.BILINEAR)), form={"top_k": "1"},
                         headers=headers)
        r = asyncio.run(fire(host, port, req))
        if r.status != 200:
            raise SystemExit(f"the idle server answered {r.status} {r.error or r.body[:200]!r} to a good image")
        cases.append(Case(f"digit{i}", req, 200, r.json()["predictions"][0]["label"]))
    return cases


def split_url(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def check(case: Case, r: Result) -> str:
    """'' for a correct answer, 'shed' for a 503 with Retry-After, else what was wrong."""
    if r.status is None:
        return f"no answer ({r.error})"
    if r.status == 503 and r.headers.get("retry-after"):
        return "shed"
    if r.status != case.status:
        return f"status {r.status} (expected {case.status})"
    try:
        body = r.json()
    except ValueError:
        return f"body is not JSON (status {r.status}: {r.body[:80]!r})"
    if case.status != 200:
        return "" if isinstance(body.get("error"), str) else "no error message"
    got = body["predictions"][0]["label"]
    return "" if got == case.label else f"label {got!r} (expected {case.label!r})"


# -- the soak --------------------------------------------------------------------------------------
def soak(url: str, server_pid: int, minutes: float, fraction: float, bad_share: float,
         headers: dict[str, str] | None = None, side: int = 256) -> dict:
    """Run the soak against a ready server; returns the summary dict (also printed)."""
    host, port = split_url(url)
    good = good_cases(url, headers=headers, side=side)
    bad = bad_cases(good_png=_first_png(good[0].request), headers=headers)
    cap = capacity(host, port, lambda i: (good[i % len(good)].request, None), seconds=5.0)
    rate = max(1.0, cap * fraction)
    every_bad = max(2, round(1 / bad_share)) if bad_share > 0 else 0
    print(f"capacity {cap:.1f} req/s ({side} px digit PNGs, closed loop of 8); soak at {rate:.1f} req/s "
          f"({fraction:.0%}) for {minutes:g} min, 1 request in {every_bad} bad", flush=True)

    def make(i: int) -> tuple[bytes, Case]:
        c = bad[(i // every_bad) % len(bad)] if every_bad and i % every_bad == every_bad - 1 else good[i % len(good)]
        return c.request, c

    workers = worker_pids(server_pid)
    rows, unexpected, shed = [], [], 0
    print(f"{'min':>3} {'sent':>6} {'200':>6} {'4xx':>5} {'503':>5} {'other':>5} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7} {'RSS MiB':>8}", flush=True)
    for minute in range(int(minutes + 0.999)):
        secs = min(60.0, (minutes - minute) * 60)
        rs = asyncio.run(open_loop(host, port, make, rate, secs, timeout=30.0))
        lat = [r.latency * 1000 for r in rs if r.tag is not None and r.tag.status == 200 and r.status == 200]
        verdicts = [(r, check(r.tag, r) if r.tag is not None else "client backlog") for r in rs]
        bad_answers = [(r.tag.name if r.tag else "-", v) for r, v in verdicts if v not in ("", "shed")]
        unexpected += bad_answers
        shed += sum(v == "shed" for _, v in verdicts)
        rss = sum(rss_kib(p) for p in workers) / 1024
        row = {"minute": minute + 1, "sent": len(rs), "ok": sum(r.status == 200 for r in rs),
               "c4xx": sum(r.status is not None and 400 <= r.status < 500 for r in rs),
               "c503": sum(r.status == 503 for r in rs),
               "other": sum(r.status is None or (r.status >= 500 and r.status != 503) for r in rs),
               "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat, default=float("nan")), "rss_mib": rss}
        rows.append(row)
        print(f"{row['minute']:>3} {row['sent']:>6} {row['ok']:>6} {row['c4xx']:>5} {row['c503']:>5} {row['other']:>5} "
              f"{row['p50']:>7.1f} {row['p99']:>7.1f} {row['max']:>7.1f} {row['rss_mib']:>8.1f}", flush=True)
        for name, v in bad_answers[:5]:
            print(f"    unexpected: {name}: {v}", flush=True)
    first, last = rows[0]["rss_mib"], rows[-1]["rss_mib"]
    p99s = [r["p99"] for r in rows]
    summary = {"capacity_rps": round(cap, 1), "rate_rps": round(rate, 1), "minutes": minutes,
               "requests": sum(r["sent"] for r in rows), "unexpected": len(unexpected), "shed_503": shed,
               "rss_first_mib": round(first, 1), "rss_last_mib": round(last, 1),
               "rss_growth_pct": round(100 * (last - first) / first, 2) if first else None,
               "p99_ms_first": round(p99s[0], 1), "p99_ms_last": round(p99s[-1], 1),
               "p99_ms_median": round(statistics.median(p99s), 1), "p99_ms_max": round(max(p99s), 1)}
    print("summary " + json.dumps(summary), flush=True)
    return summary


def _first_png(request: bytes) -> bytes:
    start = request.index(b"\x89PNG")
    end = request.index(b"\r\n--" + BOUNDARY, start)
    return request[start:end]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle directory to serve (starts bentoml serve on a free port)")
    p.add_argument("--url", help="a running server instead of --bundle, e.g. http://127.0.0.1:3000")
    p.add_argument("--server-pid", type=int, help="with --url: PID of its `bentoml serve` (for worker RSS)")
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--fraction", type=float, default=0.7, help="share of the measured capacity to offer (0.7)")
    p.add_argument("--bad-share", type=float, default=0.1, help="share of bad inputs (0.1)")
    p.add_argument("--side", type=int, default=256, help="side of the digit PNGs sent, px (256: ~2 ms decode)")
    p.add_argument("--api-key", help="send Authorization: Bearer KEY")
    p.add_argument("--log", default="loadtests/results/soak-server.log", help="server log with --bundle")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.bundle or args.url):
        p.error("give --bundle DIR or --url URL --server-pid PID")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    if args.url:
        if not args.server_pid:
            p.error("--url needs --server-pid (the soak reports the worker's RSS)")
        summary = soak(args.url, args.server_pid, args.minutes, args.fraction, args.bad_share, headers, args.side)
        return 1 if summary["unexpected"] else 0
    from service.launcher import free_port, service_server

    port = free_port()
    env = {"IMGSERVE_API_KEY": args.api_key} if args.api_key else {}
    with service_server([args.bundle], port, Path(args.log), env) as srv:
        srv.start()
        srv.wait_ready()
        summary = soak(srv.url, srv.pid, args.minutes, args.fraction, args.bad_share, headers, args.side)
    return 1 if summary["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
