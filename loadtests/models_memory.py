"""Memory of many models, and of loading/unloading them through the OIP model repository API.

    .venv/bin/python -m loadtests.models_memory --bundle bundles/r18 --copies 8 --cycles 20

0. The hypothesis, in-process (one fresh process per variant): RSS of ``--copies`` onnxruntime
   sessions of the model, each warmed up with batches 1 and 32 as the service used to, under
   ``session`` (each session its own CPU arena: onnxruntime's default, the service before),
   ``off`` (no arena) and ``shared`` (one arena for the process, what the service does now), with
   the img/s of the last session at batch 1 and 32.
1. Serves the bundle once, then ``--copies`` times (``IMGSERVE_MODELS=m1=DIR,...``): resident
   memory of the service's processes (``bentoml serve`` supervisor + worker) and seconds to ready;
   the difference per extra model, against the model file's size.
2. Serves it once with ``IMGSERVE_MODEL_CONTROL=explicit`` and answers one request, then
   ``--cycles`` times: load a second copy (``POST /v2/repository/models/extra/load``), one
   inference on it, unload it. Prints each load's seconds and the RSS before, after the first cycle
   and after the last one.
Prints one JSON document at the end (figures for docs/performance.md).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import secrets
import urllib.request
from pathlib import Path

import numpy as np

from service import launcher

log = logging.getLogger(__name__)
# Model control through the API needs an API key (the service refuses to start without one); it is sent with every call.
API_KEY = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _post(url: str, doc: dict | None = None, body: bytes | None = None, headers: dict | None = None) -> dict:
    data = body if body is not None else json.dumps(doc or {}).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={**(headers or {"Content-Type": "application/json"}), **AUTH})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read()
    return json.loads(text[:int(r.headers.get("Inference-Header-Content-Length", len(text)))])


def _infer(url: str, model: str, image: bytes) -> None:
    _post(f"{url}/v2/models/{model}/infer", body=image, headers={"Inference-Header-Content-Length": "0"})


ARENAS = ("session", "off", "shared")


def _rss_self_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sessions_rss(model: Path, arena: str, copies: int, threads: int = 2) -> dict:
    """In this process: ``copies`` warmed-up onnxruntime sessions under one arena variant."""
    import onnxruntime as ort

    if arena == "shared":
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(mem, ort.OrtArenaCfg(0, 1, -1, -1))
    base, rss, sessions = _rss_self_mib(), [], []
    for _ in range(copies):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_cpu_mem_arena = arena != "off"
        if arena == "shared":
            so.add_session_config_entry("session.use_env_allocators", "1")
        s = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
        name, shape = s.get_inputs()[0].name, s.get_inputs()[0].shape[1:]
        for n in (1, 32, 1, 32):
            s.run(None, {name: np.zeros((n, *shape), np.uint8)})
        sessions.append(s)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        rss.append(_rss_self_mib() - base)
    speed = {}
    for n in (1, 32):
        x, k, t0 = np.zeros((n, *shape), np.uint8), 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            s.run(None, {name: x})
            k += 1
        speed[f"img_s_batch{n}"] = round(k * n / (time.perf_counter() - t0), 1)
    return {"arena": arena, "rss_mib_after_each": [round(r) for r in rss],
            "first_mib": round(rss[0], 1), "per_extra_mib": round((rss[-1] - rss[0]) / max(copies - 1, 1), 1), **speed}


def arena_variants(model: Path, copies: int) -> list[dict]:
    """``sessions_rss`` for each arena variant, each in a fresh process (the shared arena is process-wide)."""
    out = []
    for arena in ARENAS:
        p = subprocess.run([sys.executable, "-m", "loadtests.models_memory", "--bundle", str(model.parent),
                            "--copies", str(copies), "--arena", arena], capture_output=True, text=True, check=True)
        out.append(json.loads(p.stdout))
        log.info("onnxruntime, arena %-7s: %s", arena, out[-1])
    return out


def serve_copies(bundle: Path, copies: int, port: int, out: Path) -> dict:
    """RSS and time to ready of the service serving ``copies`` names for the same bundle."""
    spec = ",".join(f"m{i + 1}={bundle.resolve()}" for i in range(copies))
    srv = launcher.service_server([str(bundle)], port, out / f"serve-{copies}.log", {"IMGSERVE_MODELS": spec})
    with srv.start():
        ready_s = srv.wait_ready()
        time.sleep(2.0)
        rss = launcher.rss_mib(srv.pids())
    log.info("%d model(s): %.0f MiB RSS, ready in %.1f s", copies, rss, ready_s)
    return {"copies": copies, "rss_mib": round(rss, 1), "ready_s": round(ready_s, 2)}


def load_cycles(bundle: Path, cycles: int, port: int, out: Path, image: bytes) -> dict:
    srv = launcher.service_server([str(bundle)], port, out / "serve-cycles.log",
                                  {"IMGSERVE_MODELS": f"base={bundle.resolve()}", "IMGSERVE_MODEL_CONTROL": "explicit",
                                   "IMGSERVE_API_KEY": API_KEY, "IMGSERVE_MODEL_ROOT": str(bundle.resolve().parent)})
    loads, rss = [], []
    with srv.start():
        srv.wait_ready()
        _infer(srv.url, "base", image)
        rss.append(launcher.rss_mib(srv.pids()))
        for i in range(cycles):
            t0 = time.perf_counter()
            _post(f"{srv.url}/v2/repository/models/extra/load", {"parameters": {"bundle": str(bundle.resolve())}})
            loads.append(time.perf_counter() - t0)
            _infer(srv.url, "extra", image)
            _post(f"{srv.url}/v2/repository/models/extra/unload")
            time.sleep(0.5)
            rss.append(launcher.rss_mib(srv.pids()))
            log.info("cycle %2d: load %.2f s, RSS %.0f MiB", i + 1, loads[-1], rss[-1])
    return {"cycles": cycles, "load_s_median": round(statistics.median(loads), 2), "load_s_max": round(max(loads), 2),
            "rss_before_mib": round(rss[0], 1), "rss_after_first_mib": round(rss[1], 1),
            "rss_after_last_mib": round(rss[-1], 1), "rss_growth_pct": round(100 * (rss[-1] / rss[0] - 1), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, type=Path, help="bundle directory (manifest.json, model.onnx)")
    ap.add_argument("--copies", type=int, default=8, help="models served at once in part 1")
    ap.add_argument("--cycles", type=int, default=20, help="load/unload cycles in part 2")
    ap.add_argument("--image", default=None, help="image file for the inferences (default: scikit-learn's china.jpg)")
    ap.add_argument("--out", type=Path, default=Path("loadtests/results/models-memory"), help="server logs")
    ap.add_argument("--arena", choices=ARENAS, help=argparse.SUPPRESS)  # part 0's child process
    args = ap.parse_args(argv)
    if args.arena:
        print(json.dumps(sessions_rss(args.bundle / "model.onnx", args.arena, args.copies)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from loadtests.payloads import sample_photo_path

    args.out.mkdir(parents=True, exist_ok=True)
    image = Path(args.image or sample_photo_path()).read_bytes()
    model_mib = (args.bundle / "model.onnx").stat().st_size / 2**20
    arenas = arena_variants(args.bundle / "model.onnx", args.copies)
    one = serve_copies(args.bundle, 1, launcher.free_port(), args.out)
    many = serve_copies(args.bundle, args.copies, launcher.free_port(), args.out)
    per_extra = (many["rss_mib"] - one["rss_mib"]) / max(args.copies - 1, 1)
    result = {"model_file_mib": round(model_mib, 1), "onnxruntime_arenas": arenas, "one": one, "many": many,
              "rss_per_extra_model_mib": round(per_extra, 1), "per_extra_vs_file": round(per_extra / model_mib, 2),
              "repository": load_cycles(args.bundle, args.cycles, launcher.free_port(), args.out, image)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
