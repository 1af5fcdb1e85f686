"""Where the service's time goes under load: py-spy samples of its worker while wrk drives it.

    .venv/bin/python -m loadtests.profile --bundle bundles/r18 --image china --concurrency 32 --seconds 15

Starts the service (as loadtests.bench does), warms it up, runs wrk at one concurrency and, at the
same time, `py-spy record --format raw` on every process of the service. Prints the share of
samples per stage (onnxruntime run, image decode, resize, multipart parsing, JSON, BentoML/HTTP,
other) and the top functions by own samples. py-spy is not a project dependency: give its path
with --py-spy or put it on PATH (the peers harness has one in its ray venv).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from loadtests import bench, oip_bench
from service import launcher

KINDS = ("multipart", "oip-bytes", "oip-uint8", "oip-json")

log = logging.getLogger(__name__)

# Stage of a sampled stack: the first pattern (in this order) found anywhere in the stack wins.
STAGES = [
    ("onnxruntime run", re.compile(r"onnxruntime|backends\.py")),
    ("decode (PIL load)", re.compile(r"\((?:PIL/)?(?:ImageFile|JpegImagePlugin|PngImagePlugin)\.py|load \(PIL")),
    ("resize / convert", re.compile(r"(?:resize|convert|draft) \(PIL/Image\.py")),
    ("multipart parsing", re.compile(r"multipart|formparsers", re.I)),
    ("json encode", re.compile(r"json")),
    ("metrics / tracing", re.compile(r"prometheus|opentelemetry|metrics")),
    ("bentoml / http", re.compile(r"bentoml|starlette|uvicorn|h11|httptools|anyio|asyncio")),
]


def find_py_spy(given: str | None) -> str:
    for cand in (given, shutil.which("py-spy"), "/tmp/imgserve-peers/venvs/ray/bin/py-spy"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise SystemExit("py-spy not found: pip install py-spy (anywhere) and pass --py-spy PATH")


# Layer of a sampled stack: the innermost frame that matches one of these (checked leaf first), so a
# sample counts where its time is spent, not under every middleware around it.
LAYERS = [
    ("onnxruntime", re.compile(r"onnxruntime|backends\.py")),
    ("decode + preprocess (PIL)", re.compile(r"PIL/|preprocess\.py|imgformat/")),
    ("metrics (prometheus_client)", re.compile(r"prometheus_client")),
    ("multipart parsing", re.compile(r"multipart/|service/io\.py")),
    ("json", re.compile(r"json/")),
    ("batcher", re.compile(r"service/batching\.py")),
    ("handler, validation, top-k", re.compile(r"service/(service|models|errors)\.py")),
    ("lean route", re.compile(r"service/route\.py")),
    ("BentoML api_endpoint, context, router", re.compile(r"_bentoml_impl/server/app\.py|_bentoml_sdk|starlette/|pydantic")),
    ("BentoML timeout/metrics/tracing middleware", re.compile(r"bentoml/_internal/server|opentelemetry")),
    ("uvicorn HTTP (parse, socket writes)", re.compile(r"uvicorn/|httptools")),
    ("event loop, threads", re.compile(r"asyncio/|uvloop|threading\.py|concurrent/")),
]


def layer(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, rx in LAYERS:
            if rx.search(frame):
                return name
    return "other"


def classify(stack: str) -> str:
    for name, rx in STAGES:
        if rx.search(stack):
            return name
    return "other"


def aggregate(raw_files: list[Path]) -> tuple[collections.Counter, collections.Counter, int, collections.Counter]:
    """py-spy raw (folded) output -> (samples per stage, samples per leaf function, total, samples per layer)."""
    stages: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for f in raw_files:
        for line in f.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            k = int(n)
            total += k
            stages[classify(stack)] += k
            layers[layer(stack)] += k
            leaves[stack.split(";")[-1].strip()] += k
    return stages, leaves, total, layers


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ap = argparse.ArgumentParser(prog="python -m loadtests.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    ap.add_argument("--image", default="auto", help="as loadtests.bench --image")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    ap.add_argument("--kind", default="multipart", choices=KINDS,
                    help="how to ask: multipart /classify or an Open Inference Protocol body (loadtests.oip_bench)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--py-spy", default=None, help="path of py-spy")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the service")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    spy = find_py_spy(a.py_spy)
    out = a.out or bench.HERE / "results" / ("profile-" + time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    image, fname = bench._image_bytes(a.image, a.bundle)
    path, body, env = oip_bench.bodies(a.bundle, image, fname)[a.kind]
    (out / "body.bin").write_bytes(body)
    body_env = {"BODY_FILE": str(out / "body.bin"), **env, "API_KEY": os.environ.get("IMGSERVE_API_KEY", "")}
    extra = {"IMGSERVE_PRECISION": a.precision, **dict(kv.split("=", 1) for kv in a.env)}
    server = launcher.service_server([str(a.bundle)], launcher.free_port(), out / "server.log", extra)
    with server.start():
        server.wait_ready()
        bench.run_wrk(server.url + path, 8, 5, body_env)   # warm-up
        spies = []
        for pid in server.pids():
            f = out / f"pyspy.{pid}.txt"
            cmd = [spy, "record", "--format", "raw", "-r", str(a.rate), "-d", str(a.seconds), "--nonblocking",
                   "-o", str(f), "-p", str(pid)]
            spies.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f))
        wrk_out = bench.run_wrk(server.url + path, a.concurrency, a.seconds + 2, body_env)
        for p, _ in spies:
            try:
                p.wait(timeout=a.seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
    r = bench.parse_wrk(wrk_out, a.concurrency)
    stages, leaves, total, layers = aggregate([f for _, f in spies if f.exists()])
    lines = [f"{a.bundle.name} {a.precision}, {a.kind}, {fname}, c={a.concurrency}: {r.ok_rps:.1f} ok req/s, p50 {r.p50_ms} ms",
             f"py-spy: {total} samples of non-idle Python threads ({a.rate}/s, {a.seconds} s, all service processes)", ""]
    lines += [f"  {name:<22} {n / max(total, 1):6.1%}" for name, n in stages.most_common()]
    lines += ["", "by layer (innermost matching frame):"]
    lines += [f"  {name:<44} {n / max(total, 1):6.1%}" for name, n in layers.most_common()]
    lines += ["", "top functions by own samples:"]
    lines += [f"  {n / max(total, 1):6.1%}  {fn[:110]}" for fn, n in leaves.most_common(15)]
    text = "\n".join(lines)
    bench.publish(text, out / "profile.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
