"""Before/after in one run: open-loop steps (loadtests.openloop) against several imgserve variants.

    .venv/bin/python -m loadtests.openloop_ab --bundle DIR --image photo.png --slo-ms 1000 \\
        --variant before=/tmp/before-checkout:IMGSERVE_MAX_LATENCY_MS=10000 --variant after=.:

Each ``--variant NAME=CHECKOUT[:K=V,K=V]`` (as in loadtests.ab) serves the bundle with the code of
CHECKOUT (e.g. ``git worktree add`` of an older commit) and those settings, on a free
port, and offered the same steps: multiples of one capacity (``--capacity``, or the first
variant's closed-loop capacity), so every variant meets the same arrivals. Variants run one
after the other in the order given, each repeated ``--rounds`` times alternately.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from loadtests.ab import parse_variant
from loadtests.openloop import ENGINES, HEADER, measure_capacity, run_steps, save_json, table
from loadtests.soak import image_post
from service import launcher


def _cpus(text: str) -> set[int]:
    return {int(c) for c in text.split(",")}


@contextlib.contextmanager
def pinned(server_cpus: set[int] | None) -> Iterator[None]:
    """Run the block on ``server_cpus``; then keep this process (the generator) off them, so that a
    generator needing a core of its own at 2x-4x a small model's capacity does not take the server's."""
    if not server_cpus:
        yield
        return
    every = os.sched_getaffinity(0)
    os.sched_setaffinity(0, server_cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, (every - server_cpus) or every)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--steps", default="0.5,0.9,1.2,2,4")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--recovery-s", type=float, default=10.0)
    p.add_argument("--slo-ms", type=float, default=1000.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--capacity", type=float,
                   help="req/s the steps multiply for every variant (the same offered load); default: the "
                        "first variant's closed-loop capacity, measured once")
    p.add_argument("--engine", default="python", choices=ENGINES.names(), help="what sends the arrivals")
    p.add_argument("--server-cpus", type=_cpus, help="pin each server to these CPUs (e.g. 1) and this client to the rest")
    p.add_argument("--json-dir", type=Path, help="one JSON per variant and round (loadtests.openloop_plot reads them)")
    args = p.parse_args(argv)
    ctype = "image/png" if args.image.suffix.lower() == ".png" else "image/jpeg"
    request = image_post(args.image.read_bytes(), filename=args.image.name.encode(), ctype=ctype,
                         form={"top_k": "1"})
    steps = [float(x) for x in args.steps.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="openloop-ab-"))
    out = []
    for rnd in range(args.rounds):
        for v in map(parse_variant, args.variant):
            name = v.name
            server = launcher.service_server([args.bundle], launcher.free_port(), logs / f"{name}.{rnd}.log",
                                             {"PYTHONPATH": str(v.repo), **v.env})
            server.cwd = v.repo
            with pinned(args.server_cpus):  # the server inherits this process's CPUs at fork
                server.start()
            try:
                server.wait_ready(timeout_s=300)
                load = Path("/proc/loadavg").read_text().split()[:3]
                cap = args.capacity = (args.capacity
                                       or measure_capacity(server.url + "/classify", request, engine=args.engine))
                stats, rec = run_steps(server.url + "/classify", request, cap, steps, args.seconds,
                                       args.slo_ms / 1000, args.recovery_s, 30.0, 4000, args.engine)
            finally:
                server.stop()
            if args.json_dir:
                save_json(args.json_dir / f"{name}.r{rnd + 1}.json", name, cap, args.slo_ms, load, stats, rec,
                          args.engine)
            out.append(table(f"{name} (round {rnd + 1}, load {' '.join(load)})", cap, stats, rec, args.slo_ms))
            print(f"{name}: capacity {cap:.1f} req/s\n{HEADER}\n{out[-1]}", flush=True)
    print("\n" + HEADER + "\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
