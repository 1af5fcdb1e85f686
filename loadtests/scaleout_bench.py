"""Benchmark: N replicas of the image behind HAProxy against one process, in one run on one machine.

    flock /tmp/imgserve-bench.lock .venv/bin/python -m loadtests.scaleout_bench --bundle bundles/r18 \
        --image localhost/imgserve:cpu --concurrency 8,32,64 --duration 20

The targets run side by side (idle ones cost nothing) and are measured in turns, the same request
(china.jpg as a multipart upload, wrk from loadtests.bench with keep-alive connections) at each
concurrency, for --rounds rounds, the order of the targets alternating: on a shared machine a
change of background load then hits every target alike.
  1. one `bentoml serve` process (IMGSERVE_THREADS = all cores): the baseline;
  2. N containers of the image (IMGSERVE_THREADS = cores / N each) behind HAProxy (deploy.replicas);
  3. with --with-container: one container addressed directly (all cores): what the container costs.
For each run: 2xx req/s, p50/p99, errors, the servers' CPU ms per request, and for HAProxy its own
CPU ms per request (utime + stime of its process from /proc). Prints every run, each target's best
2xx req/s and its ratio to the single process's best, and the median of the per-round ratios;
saves scaleout.json in the results folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from service import launcher
from loadtests.bench import SETTLE_S, WrkResult, parse_wrk, run_wrk
from loadtests.payloads import multipart, sample_photo_path

log = logging.getLogger(__name__)


@dataclass
class Target:
    """Something to measure: where to send, which processes are the servers, which is the balancer."""

    name: str
    url: str
    server_pids: Callable[[], list[int]]
    balancer_pids: Callable[[], list[int]] = lambda: []


@dataclass
class Row:
    target: str
    round: int
    concurrency: int
    ok_rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    error_detail: str
    server_cpu_ms_per_req: float | None
    balancer_cpu_ms_per_req: float | None


def measure(t: Target, path: str, body_env: dict[str, str], c: int, duration_s: int, rnd: int) -> Row:
    """One wrk run at concurrency c, with the CPU counters read around it."""
    url = t.url.rstrip("/") + path
    time.sleep(SETTLE_S)
    s0, b0 = launcher.cpu_seconds(t.server_pids()), launcher.cpu_seconds(t.balancer_pids())
    r: WrkResult = parse_wrk(run_wrk(url, c, duration_s, body_env), c)
    s1, b1 = launcher.cpu_seconds(t.server_pids()), launcher.cpu_seconds(t.balancer_pids())
    n = r.requests or 1
    row = Row(t.name, rnd, c, r.ok_rps, r.p50_ms, r.p99_ms, r.errors, r.error_detail, (s1 - s0) / n * 1e3,
              (b1 - b0) / n * 1e3 if t.balancer_pids() else None)
    log.info("round %d %-22s c=%-3d %7.1f 2xx req/s  p50 %7.1f  p99 %7.1f ms  errors %d  server CPU %.1f ms/req%s",
             rnd, t.name, c, row.ok_rps, row.p50_ms or 0, row.p99_ms or 0, row.errors, row.server_cpu_ms_per_req,
             f"  HAProxy CPU {row.balancer_cpu_ms_per_req:.3f} ms/req" if row.balancer_cpu_ms_per_req is not None else "")
    return row


def container_pids(cluster) -> Callable[[], list[int]]:
    """Host PIDs of every process in the cluster's containers (each container's main process and descendants)."""
    from deploy.replicas.runners import get_runner

    runner = get_runner(cluster.runner)

    def pids() -> list[int]:
        out: list[int] = []
        for r in cluster.replicas().values():
            out += launcher.tree_pids(runner.server_pid(r))
        return out
    return pids


def start_process(bundle: Path, out: Path, stack: ExitStack) -> Target:
    srv = launcher.service_server([str(bundle)], launcher.free_port(), out / "process.log")
    stack.enter_context(srv)
    srv.start()
    srv.wait_ready()
    return Target("1 process", srv.url, srv.pids)


def start_cluster(name: str, n: int, direct: bool, bundle: Path, image: str, out: Path, stack: ExitStack) -> Target:
    from deploy.replicas.cluster import Cluster

    c = Cluster(out / name.replace(" ", "-"), runner="podman", image=image)
    stack.callback(c.down)
    c.up(n, {"IMGSERVE_THREADS": str(max(1, (os.cpu_count() or 1) // n))}, bundle, port=0)
    if direct:  # the one replica itself, HAProxy idle
        (r,) = c.replicas().values()
        return Target(name, r.url, container_pids(c))
    return Target(name, c.url, container_pids(c), lambda: [c.haproxy_pid] if c.haproxy.is_ours() else [])


def table(rows: list[Row]) -> str:
    head = (f"| target | round | conc | 2xx req/s | p50 ms | p99 ms | errors | server CPU ms/req | HAProxy CPU ms/req |\n"
            f"|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    f = lambda v, s=".1f": "-" if v is None else format(v, s)
    return "\n".join([head] + [f"| {r.target} | {r.round} | {r.concurrency} | {r.ok_rps:.1f} | {f(r.p50_ms)} | {f(r.p99_ms)} | "
                               f"{r.errors}{' (' + r.error_detail + ')' if r.error_detail else ''} | "
                               f"{f(r.server_cpu_ms_per_req)} | {f(r.balancer_cpu_ms_per_req, '.3f')} |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (e.g. bundles/r18)")
    p.add_argument("--image", default=os.environ.get("IMGSERVE_IMAGE", "localhost/imgserve:cpu"))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", default="8,32,64")
    p.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    p.add_argument("--image-file", default="china", help="china, flower or a path: the uploaded photo")
    p.add_argument("--rounds", type=int, default=2, help="measuring rounds, target order alternating (default 2)")
    p.add_argument("--with-container", action="store_true", help="also one container addressed directly")
    p.add_argument("--out", type=Path, default=Path("loadtests/results") / time.strftime("scaleout-%Y%m%d-%H%M%S"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (a.bundle / "manifest.json").is_file():
        raise SystemExit(f"{a.bundle} is not a bundle (no manifest.json): see the README's ResNet-18 recipe")
    a.out.mkdir(parents=True, exist_ok=True)
    photo = Path(sample_photo_path(a.image_file) if a.image_file in ("china", "flower") else a.image_file)
    body, ctype = multipart({"top_k": "1"}, [("image", (photo.name, photo.read_bytes(), "image/jpeg"))])
    (a.out / "body.bin").write_bytes(body)
    body_env = {"BODY_FILE": str(a.out / "body.bin"), "CONTENT_TYPE": ctype}
    concs = [int(c) for c in a.concurrency.split(",")]
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]

    rows: list[Row] = []
    with ExitStack() as stack:
        targets = [start_process(a.bundle, a.out, stack),
                   start_cluster(f"{a.replicas} replicas + HAProxy", a.replicas, False, a.bundle, a.image, a.out, stack)]
        if a.with_container:
            targets.append(start_cluster("1 container (direct)", 1, True, a.bundle, a.image, a.out, stack))
        for t in targets:
            run_wrk(t.url + "/classify", 8, 5, body_env)  # warm-up, not counted
        for rnd in range(1, a.rounds + 1):
            for c in concs:
                for t in (targets if rnd % 2 else targets[::-1]):
                    rows.append(measure(t, "/classify", body_env, c, a.duration, rnd))
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    best = {t: max(r.ok_rps for r in rows if r.target == t) for t in dict.fromkeys(r.target for r in rows)}
    base = best["1 process"] or float("nan")
    paired = {t: statistics.median(r.ok_rps / p.ok_rps for r in rows if r.target == t
                                   for p in rows if p.target == "1 process" and (p.round, p.concurrency) ==
                                   (r.round, r.concurrency) and p.ok_rps)
              for t in best if t != "1 process"}
    print(table(rows))
    print("\nbest 2xx req/s: " + "; ".join(f"{t} {v:.1f} ({v / base:.2f}x)" for t, v in best.items()))
    print("median of the per-run ratios to the process (same round and concurrency): " +
          "; ".join(f"{t} {v:.2f}x" for t, v in paired.items()))
    print(f"uptime before: {uptime[0]}\nuptime after:  {uptime[1]}")
    (a.out / "scaleout.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "best": best, "paired": paired,
                                                     "uptime": uptime, "args": vars(a)}, indent=1, default=str))
    print(f"saved {a.out / 'scaleout.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
