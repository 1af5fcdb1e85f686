"""Variants of the service side by side in one run: the same body, wrk settings and CPU accounting.

    .venv/bin/python -m loadtests.ab --bundle bundles/default --image fashion \\
        --variant base=../main-checkout --variant lean=. --variant 'w2=.:IMGSERVE_WORKERS=2' --rounds 2

A variant is ``NAME=DIR[:K=V,K=V]``: the service of the checkout in DIR (run from there, with
PYTHONPATH=DIR) with extra environment. Rounds interleave the variants, in turn forwards and
backwards (A B C C B A), so a drift in the machine's speed or a place in the order hits all
alike. Per variant and concurrency it prints 2xx req/s, p50/p99, errors, the server's CPU ms per request (all its processes, from /proc), its resident
memory per process, and the service's own stage timers (mean ms, from /metrics). Compare only
within one run: this is a shared machine.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtests import bench
from service import launcher
from loadtests.payloads import multipart

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    repo: Path
    env: dict[str, str]
    results: dict[int, list[bench.WrkResult]] = field(default_factory=dict)
    rss_mib: list[float] = field(default_factory=list)  # per process, at the end of each round
    procs: int = 0


def parse_variant(spec: str) -> Variant:
    name, _, rest = spec.partition("=")
    repo, _, envs = rest.partition(":")
    if not name or not repo:
        raise SystemExit(f"--variant {spec!r}: expected NAME=DIR[:K=V,K=V]")
    env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
    return Variant(name, Path(repo).resolve(), env)


def run_round(v: Variant, bundle: Path, body_env: dict[str, str], concs: list[int], secs: int, out: Path,
              rnd: int) -> None:
    port = launcher.free_port()
    server = launcher.service_server([str(bundle)], port, out / f"{v.name}.{rnd}.log",
                                     {"PYTHONPATH": str(v.repo), **v.env})
    server.cwd = v.repo
    with server.start():
        server.wait_ready()
        bench.run_wrk(server.url + "/classify", 8, 3, body_env)  # warm-up
        for r in bench.measure_server(server, "/classify", body_env, concs, secs):
            v.results.setdefault(r.concurrency, []).append(r)
        pids = [p for p in server.pids() if b"_bentoml_impl.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        v.procs = len(pids)
        v.rss_mib += [launcher.rss_mib([p]) for p in pids]


def table(variants: list[Variant], concs: list[int]) -> str:
    head = "| variant | workers | c | 2xx req/s (each round) | p50 ms | p99 ms | errors | CPU ms/req | stages ms (mean) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for v in variants:
        for c in concs:
            rs = v.results.get(c, [])
            if not rs:
                continue
            rps = " / ".join(f"{r.ok_rps:.0f}" for r in rs)
            p50 = statistics.median(r.p50_ms or 0 for r in rs)
            p99 = statistics.median(r.p99_ms or 0 for r in rs)
            cpu = [r.cpu_ms_per_req for r in rs if r.cpu_ms_per_req is not None]
            stages = rs[-1].stages_ms
            st = ", ".join(f"{k} {val:.3f}" for k, val in stages.items())
            lines.append(f"| {v.name} | {v.procs} | {c} | {rps} | {p50:.2f} | {p99:.2f} | {sum(r.errors for r in rs)} | "
                         f"{statistics.median(cpu):.3f} | {st} |" if cpu else
                         f"| {v.name} | {v.procs} | {c} | {rps} | {p50:.2f} | {p99:.2f} | {sum(r.errors for r in rs)} | - | {st} |")
    mem = [f"{v.name}: {statistics.median(v.rss_mib):.0f} MiB per worker process" for v in variants if v.rss_mib]
    return "\n".join(lines + ["", "; ".join(mem)])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ap = argparse.ArgumentParser(prog="python -m loadtests.ab", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    ap.add_argument("--image", default="auto", help="as loadtests.bench --image")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=DIR[:K=V,...]")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    variants = [parse_variant(s) for s in a.variant]
    concs = [int(c) for c in a.concurrency.split(",") if c]
    out = a.out or bench.HERE / "results" / ("ab-" + time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    image, fname = bench._image_bytes(a.image, a.bundle)
    n_classes = int(__import__("json").loads((a.bundle / "manifest.json").read_text())["num_classes"])
    body, ctype = multipart({"top_k": str(min(5, n_classes))},
                            [("image", (fname, image, "image/jpeg" if fname.endswith(".jpg") else "image/png"))])
    (out / "body.bin").write_bytes(body)
    body_env = {"BODY_FILE": str(out / "body.bin"), "CONTENT_TYPE": ctype, "API_KEY": os.environ.get("IMGSERVE_API_KEY", "")}
    load = [os.getloadavg()[0]]
    for rnd in range(a.rounds):
        # A B, then B A: on this machine the second server of a pair measured up to 10 % faster
        # than the first whatever it ran (docs/monitoring.md), so each variant goes first as often.
        for v in (variants if rnd % 2 == 0 else variants[::-1]):
            run_round(v, a.bundle.resolve(), body_env, concs, a.seconds, out, rnd)
            load.append(os.getloadavg()[0])
    text = (f"{a.bundle.name}, {fname} ({len(image)} bytes), wrk {a.seconds} s per point, {a.rounds} interleaved "
            f"rounds; load average (1 min) {min(load):.1f}-{max(load):.1f}\n\n" + table(variants, concs))
    bench.publish(text, out / "ab.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
