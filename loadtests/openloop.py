"""Open-loop load steps against any HTTP image classifier (imgserve or a peer), free of coordinated omission.

    .venv/bin/python -m loadtests.openloop --url http://127.0.0.1:PORT/classify --image china.jpg \\
        --slo-ms 1000 --capacity 40 --seconds 20 --json out.json --md out.md

Arrivals follow a fixed schedule (request i of a step is due at ``i / rate``), whatever the answers
do: a slow server gets more requests in flight, not fewer arrivals. Every latency is measured from
the request's *due* time, not from when the client managed to send it, so a client that falls
behind its schedule (a busy event loop, a busy machine) adds its lag to the latency instead of
hiding it (coordinated omission). The lag itself is reported per step (``lag p99``) so a reader can
see when the generator, not the server, was the limit.

Steps are multiples of ``--capacity`` (req/s; measured with a short closed loop when not given),
each ``--seconds`` long, back to back. After the last step a recovery phase offers the first
step's rate for ``--recovery-s`` seconds; recovery time is when, counted from the end of the last
step, every later 0.5 s bucket of arrivals is answered 2xx with p99 within 1.5x the first step's p99.

Per step: goodput (2xx answered within ``--slo-ms`` of their due time, per second), the error mix
(503, other statuses, timeouts, connection errors), p50/p99/p99.9 of the 2xx answers.
Engines send the arrivals (``--engine``, the registry ENGINES), and the same code turns their
per-request results into rows: ``python`` (the reference: loadtests.soak's raw-socket client on
one asyncio loop, a fresh connection per request), ``vegeta`` and ``vegeta-keepalive``
(loadtests.openloop_vegeta: the Go load generator, fresh or reused connections; what each costs
the client per request is in docs/loadtests.md). Each row says the rate the generator achieved
next to the one offered, so a generator that could not keep up is visible.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from imgformat.registry import Registry
from loadtests.soak import Result, closed_loop, fire, image_post, pct, split_url

DEFAULT_STEPS = (0.5, 0.9, 1.2, 2.0, 4.0)
BUCKET_S = 0.5
RECOVERED_P99_FACTOR = 1.5


@dataclass
class Shot:
    """One arrival: when it was due (s from the run's start), its CO-free latency and outcome."""

    due: float
    latency: float  # from due time to the end of the answer
    lag: float  # how late the client sent it
    outcome: str  # "200", "503", ..., "timeout", "ConnectionResetError", or one of NOT_SENT


# Arrivals the generator never sent: past --max-outstanding (python), or still unsent when the
# step's time was up (vegeta stops its schedule at -duration). They count in the error mix.
NOT_SENT = ("client_backlog", "client_unsent")


@dataclass(frozen=True)
class Phase:
    """One step of the plan: ``rate`` req/s for ``seconds``, starting ``start`` s after the run's t=0."""

    name: str
    rate: float
    seconds: float
    start: float

    @property
    def count(self) -> int:  # arrivals in the step, the same for every engine
        return max(1, int(self.rate * self.seconds))


@dataclass
class StepStats:
    name: str
    rate: float
    seconds: float
    sent: int
    goodput: float  # 2xx within the SLO, per second of the step
    ok: int
    ok_late: int
    outcomes: dict[str, int] = field(default_factory=dict)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    p999_ms: float = float("nan")
    lag_p99_ms: float = float("nan")
    achieved_rate: float = float("nan")  # requests the generator sent per second of the step


async def offer(host: str, port: int, request: bytes, rate: float, seconds: float, start: float,
                timeout: float, max_outstanding: int) -> tuple[list[Shot], set[asyncio.Task]]:
    """Send ``request`` at ``rate`` req/s for ``seconds`` on the fixed schedule; ``start`` is the run's t=0.

    Returns the shots (filled in as answers come) and the requests still open when the schedule ends."""
    n = max(1, int(rate * seconds))
    t0 = time.perf_counter()
    base = t0 - start
    open_: set[asyncio.Task] = set()
    shots: list[Shot] = []

    async def one(due_abs: float) -> None:
        lag = time.perf_counter() - due_abs
        r: Result = await fire(host, port, request, timeout)
        shots.append(Shot(due_abs - start, r.latency + lag, lag, str(r.status) if r.status else r.error or "error"))

    for i in range(n):
        due_abs = t0 + i / rate
        delay = due_abs - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(open_) >= max_outstanding:  # bounded client memory: counted, never silently skipped
            shots.append(Shot(base + i / rate, float("inf"), 0.0, "client_backlog"))
            continue
        task = asyncio.create_task(one(due_abs))
        open_.add(task)
        task.add_done_callback(open_.discard)
    # Wait only for the remaining answers; the next step's schedule starts now, as offered load would.
    return shots, open_


def summarize(phase: Phase, shots: Sequence[Shot], slo_s: float) -> StepStats:
    ok = [s.latency for s in shots if s.outcome.startswith("2")]
    good = sum(lat <= slo_s for lat in ok)
    sent = [s for s in shots if s.outcome not in NOT_SENT]
    return StepStats(phase.name, phase.rate, phase.seconds, len(shots), good / phase.seconds, len(ok),
                     len(ok) - good, dict(Counter(s.outcome for s in shots)), pct(ok, 50) * 1000,
                     pct(ok, 99) * 1000, pct(ok, 99.9) * 1000, pct([s.lag for s in sent], 99) * 1000,
                     achieved_rate(phase, sent))


def achieved_rate(phase: Phase, sent: Sequence[Shot]) -> float:
    """Requests sent per second, over the step or until the last late send if that is longer: an
    on-time generator achieves the offered rate, one that fell behind (or dropped arrivals) less."""
    if not sent:
        return 0.0
    last_send = max(s.due + s.lag for s in sent)
    return len(sent) / max(phase.seconds, last_send - phase.start)


def recovery_time(shots: Sequence[Shot], after: float, normal_p99_s: float) -> float | None:
    """Seconds from ``after`` until every later 0.5 s bucket of arrivals is all-2xx with p99 within
    1.5x ``normal_p99_s``; None when the run ended unrecovered."""
    buckets: dict[int, list[Shot]] = {}
    for s in shots:
        if s.due >= after:
            buckets.setdefault(int((s.due - after) / BUCKET_S), []).append(s)
    healthy = lambda b: (all(s.outcome.startswith("2") for s in b)
                         and pct([s.latency for s in b], 99) <= RECOVERED_P99_FACTOR * normal_p99_s)
    keys = sorted(buckets)
    recovered_from = None
    for k in keys:
        if healthy(buckets[k]):
            recovered_from = k if recovered_from is None else recovered_from
        else:
            recovered_from = None
    return None if recovered_from is None else recovered_from * BUCKET_S


def plan(capacity: float, steps: Sequence[float], seconds: float, recovery_s: float) -> list[Phase]:
    """The steps back to back, then the recovery phase at the first step's rate."""
    phases: list[Phase] = []
    for name, rate, secs in [(f"{m:g}x", m * capacity, seconds) for m in steps] + [
            ("recovery", steps[0] * capacity, recovery_s)]:
        phases.append(Phase(name, rate, secs, sum(p.seconds for p in phases)))
    return phases


async def _python_phases(url: str, request: bytes, phases: Sequence[Phase], timeout: float,
                         max_outstanding: int) -> list[list[Shot]]:
    host, port = split_url(url)
    start = time.perf_counter()
    shots: list[list[Shot]] = []
    pending: set[asyncio.Task] = set()
    for ph in phases:
        step_shots, open_ = await offer(host, port, request, ph.rate, ph.seconds, start, timeout, max_outstanding)
        shots.append(step_shots)
        pending |= open_
    await asyncio.gather(*pending)  # every request ends within its timeout: the run is bounded
    return shots


def python_engine(url: str, request: bytes, phases: Sequence[Phase], timeout: float,
                  max_outstanding: int) -> list[list[Shot]]:
    """The reference engine: this process's asyncio loop sends every arrival."""
    return asyncio.run(_python_phases(url, request, phases, timeout, max_outstanding))


@dataclass(frozen=True)
class Engine:
    """What sends the arrivals: ``offer(url, raw request, phases, timeout, max_outstanding)`` -> the
    shots of each phase, ``due`` in seconds from the run's start; ``capacity(url, raw request,
    concurrency, seconds)`` -> 2xx/s of a closed loop with the same connections. Every engine's
    shots go through the same summarize/recovery_time."""

    offer: Callable[[str, bytes, Sequence[Phase], float, int], list[list[Shot]]]
    capacity: Callable[[str, bytes, int, float], float]


def vegeta_engine(keepalive: bool) -> Engine:
    # imported on use: loadtests.openloop_vegeta needs this module's Shot and Phase
    def offer(url: str, request: bytes, phases: Sequence[Phase], timeout: float,
              max_outstanding: int) -> list[list[Shot]]:
        from loadtests.openloop_vegeta import run_phases
        return run_phases(url, request, phases, timeout, max_outstanding, keepalive)

    def capacity(url: str, request: bytes, concurrency: int, seconds: float) -> float:
        from loadtests.openloop_vegeta import closed_loop_capacity
        return closed_loop_capacity(url, request, concurrency, seconds, keepalive)
    return Engine(offer, capacity)


def run_steps(url: str, request: bytes, capacity: float, steps: Sequence[float], seconds: float,
              slo_s: float, recovery_s: float, timeout: float, max_outstanding: int, engine: str = "python"
              ) -> tuple[list[StepStats], float | None]:
    phases = plan(capacity, steps, seconds, recovery_s)
    shots = ENGINES.get(engine).offer(url, request, phases, timeout, max_outstanding)
    stats = [summarize(ph, sh, slo_s) for ph, sh in zip(phases, shots)]
    rec = recovery_time(shots[-1], phases[-1].start, stats[0].p99_ms / 1000)
    return stats, rec


def python_capacity(url: str, request: bytes, concurrency: int = 8, seconds: float = 10.0) -> float:
    """2xx per second of a closed loop at ``concurrency`` after a 2 s warm-up."""
    host, port = split_url(url)
    make = lambda i: (request, None)
    asyncio.run(closed_loop(host, port, make, concurrency, 2.0))
    t0 = time.perf_counter()
    rs = asyncio.run(closed_loop(host, port, make, concurrency, seconds))
    return sum(r.status is not None and 200 <= r.status < 300 for r in rs) / (time.perf_counter() - t0)


ENGINES: Registry[Engine] = Registry("engine", keep_order=True)
ENGINES.add("python", Engine(python_engine, python_capacity))
ENGINES.add("vegeta", vegeta_engine(keepalive=False))  # fresh connections, as the python engine
ENGINES.add("vegeta-keepalive", vegeta_engine(keepalive=True))  # reused connections: less client CPU


def measure_capacity(url: str, request: bytes, concurrency: int = 8, seconds: float = 10.0,
                     engine: str = "python") -> float:
    """The capacity the steps multiply: the engine's own closed loop at ``concurrency``."""
    return ENGINES.get(engine).capacity(url, request, concurrency, seconds)


def _mix(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()) if not k.startswith("2")) or "-"


def table(server: str, capacity: float, stats: Sequence[StepStats], rec: float | None, slo_ms: float) -> str:
    """Markdown rows (one per step) for the peers harness's results.md or docs/performance.md."""
    rows = [f"| {server} | {s.name} | {s.rate:.1f} | {s.sent} | {s.goodput:.1f} ({s.goodput / capacity:.2f}x) | "
            f"{s.ok_late} | {_mix(s.outcomes)} | {s.p50_ms:.0f} / {s.p99_ms:.0f} / {s.p999_ms:.0f} | "
            f"{s.achieved_rate:.1f} | {s.lag_p99_ms:.0f} |" for s in stats]
    recov = "not within the recovery phase" if rec is None else f"{rec:.1f} s"
    return "\n".join(rows + [f"| {server} | recovery after the last step | | | | | {recov} | | | |"])


HEADER = ("| server | step | offered req/s | sent | goodput/s (x capacity) | 2xx over SLO | errors | "
          "2xx p50 / p99 / p99.9 ms | sent req/s | client lag p99 ms |\n|---|---|---|---|---|---|---|---|---|---|")


def save_json(path: Path, server: str, capacity: float, slo_ms: float, load: Sequence[str],
              stats: Sequence[StepStats], rec: float | None, engine: str = "python") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"server": server, "engine": engine, "capacity": capacity, "slo_ms": slo_ms,
                                "loadavg": list(load),
                                "recovery_s": rec, "steps": [asdict(s) for s in stats]}, indent=1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="loopback URL taking a multipart upload")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--field", default="image", help="multipart field of the image")
    p.add_argument("--form", default="", help="extra fields, k=v&k2=v2")
    p.add_argument("--raw", action="store_true", help="post the bare image bytes instead of a form")
    p.add_argument("--name", default="target", help="row label")
    p.add_argument("--capacity", type=float,
                   help="req/s; measured when omitted: a closed loop at c=8 of the engine's own connections")
    p.add_argument("--steps", default=",".join(f"{m:g}" for m in DEFAULT_STEPS))
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--recovery-s", type=float, default=10.0)
    p.add_argument("--slo-ms", type=float, default=1000.0)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--max-outstanding", type=int, default=4000,
                   help="requests in flight at most (python: arrivals past it count as client_backlog; "
                        "vegeta: its -max-workers)")
    p.add_argument("--engine", default="python", choices=ENGINES.names(),
                   help="what sends the arrivals (python: the reference; vegeta: the Go generator, fresh "
                        "connections like python; vegeta-keepalive: reused connections; both need "
                        "scripts/get_vegeta.sh)")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path, help="append the table rows here (header written when new)")
    return p


def _request(args: argparse.Namespace) -> bytes:
    from loadtests.soak import raw_post
    path = "/" + args.url.split("://", 1)[-1].split("/", 1)[1] if "/" in args.url.split("://", 1)[-1] else "/"
    data = args.image.read_bytes()
    ctype = "image/png" if args.image.suffix.lower() == ".png" else "image/jpeg"
    if args.raw:
        return raw_post(path, data, ctype)
    form = dict(kv.split("=", 1) for kv in args.form.split("&") if kv)
    return image_post(data, field_name=args.field, path=path, filename=args.image.name.encode(), ctype=ctype,
                      form=form)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    request = _request(args)
    cap = args.capacity or measure_capacity(args.url, request, engine=args.engine)
    steps = [float(x) for x in args.steps.split(",")]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    stats, rec = run_steps(args.url, request, cap, steps, args.seconds, args.slo_ms / 1000, args.recovery_s,
                           args.timeout, args.max_outstanding, args.engine)
    rows = table(args.name, cap, stats, rec, args.slo_ms)
    print(f"{args.name}: engine {args.engine}, capacity {cap:.1f} req/s, SLO {args.slo_ms:g} ms, "
          f"load average at start {' '.join(load)}")
    print(HEADER + "\n" + rows)
    if args.json:
        save_json(args.json, args.name, cap, args.slo_ms, load, stats, rec, args.engine)
    if args.md:
        new = not args.md.exists()
        with args.md.open("a") as f:
            f.write((HEADER + "\n" if new else "") + rows + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
