"""The GPU check, for the day a GPU host is available: one command, one report (docs/container.md, "The GPU check").

    python -m loadtests.gpu_check --bundle BUNDLE [--image imgserve:gpu] [--out build/gpu-check]

BUNDLE should hold model.fp16.onnx (`python -m export CKPT --out BUNDLE --fp16`; scripts/gpu_check.sh
makes one). Needs onnxruntime with the CUDA provider in this Python (onnxruntime-gpu[cuda,cudnn]
==1.26.0, the GPU image's pins), a CUDA device, nvidia-smi and wrk. It measures, in this order:

1. parity: ORT-CUDA FP32 logits against ORT-CPU FP32 on real images, within the bundle's own parity
   gate (its atol/rtol and top-1 agreement);
2. FP16 parity: ORT-CUDA on model.fp16.onnx against ORT-CPU FP32, within the FP16 gate;
3. GPU memory per model: each model file loaded alone in a fresh process, its largest batch run,
   its used_memory read from nvidia-smi (the CUDA context included; an idle context is measured too);
4. throughput: in-process ORT-CUDA (decode + preprocess + ORT, the service's own code) at each batch,
   against the server with the GPU (`bentoml serve`, or `--image` run with the GPUs) under wrk; the
   goal is served best >= 0.8x the in-process best; the served answers equal the CPU's ranking.

Bounded: about 5 minutes on one GPU with the defaults (parity ~10 s, memory ~40 s, in-process
~1 min, server start + wrk ~2 min).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtests import bench
from loadtests.payloads import fashion_pngs, multipart, photo_jpegs
from service import launcher

log = logging.getLogger("gpu_check")
FP16_GATE = {"atol": 2e-2, "rtol": 2e-2, "min_top1_agreement": 0.98}  # export/fp16.py's FP16_TOLERANCES
GOAL = 0.8  # served best / in-process best
GPU_RUN_ARGS = {"docker": ["--gpus", "all"], "podman": ["--device", "nvidia.com/gpu=all"]}


def images() -> list[bytes]:
    return [p.data for p in photo_jpegs((224, 640))] + [p.data for p in fashion_pngs(60)]


def batch_of(bundle, imgs: list[bytes]) -> np.ndarray:
    from imgformat.preprocess import Preprocessor

    pre = Preprocessor.from_manifest(bundle.manifest["preprocessing"], max_pixels=400_000_000)
    return np.stack([pre(b) for b in imgs])  # (N, H, W, C) uint8


def compare(ref: np.ndarray, got: np.ndarray, gate: dict) -> dict:
    diff = np.abs(got.astype(np.float64) - ref)
    within = diff <= gate["atol"] + gate["rtol"] * np.abs(ref)
    top1 = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return {"max_abs": float(diff.max()), "within_tol": float(within.mean()), "top1_agreement": top1,
            "gate": gate, "passed": bool(within.all() and top1 >= gate["min_top1_agreement"])}


def parity(bundle_dir: Path) -> dict:
    from imgformat.bundle import load_bundle
    from service.backends import create_backend

    b = load_bundle(bundle_dir)
    x = batch_of(b, images())
    cpu = create_backend("onnx", b.model_file("onnx", "fp32"), threads=os.cpu_count() or 1, device="cpu").run(x)
    out = {"images": len(x)}
    gpu = create_backend("onnx", b.model_file("onnx", "fp32"), threads=1, device="cuda")
    assert gpu.device == "cuda", f"the CUDA provider did not load: {gpu.providers}"
    tol = b.manifest["parity"]["tolerances"]
    out["fp32"] = compare(cpu, gpu.run(x), tol)
    try:
        f16 = create_backend("onnx", b.model_file("onnx", "fp16"), threads=1, device="cuda")
        out["fp16"] = compare(cpu, f16.run(x), (b.manifest.get("fp16") or {}).get("tolerances") or FP16_GATE)
    except Exception as e:  # a bundle exported without --fp16
        out["fp16"] = {"skipped": str(e)}
    return out


MEM_PROBE = r"""
import sys, time, numpy as np
from imgformat.bundle import load_bundle
from service.backends import create_backend
b = load_bundle(sys.argv[1]); prec, big = sys.argv[2], int(sys.argv[3])
if prec == "none":
    import ctypes; lib = ctypes.CDLL("libcudart.so.12"); lib.cudaFree(0)   # an idle CUDA context
else:
    be = create_backend("onnx", b.model_file("onnx", prec), threads=1, device="cuda")
    i = b.manifest["input"]
    be.run(np.zeros((big, i["height"], i["width"], i["channels"]), np.uint8))
print("ready", flush=True); time.sleep(30)
"""


def used_mib(pid: int) -> float | None:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    got = [float(ln.split(",")[1]) for ln in out.splitlines() if ln.split(",")[0].strip() == str(pid)]
    return got[0] if got else None


def gpu_memory(bundle_dir: Path, big: int) -> dict:
    """MiB used on the GPU by one process holding one model after its largest batch ('none': the context alone)."""
    out = {}
    for prec in ("none", "fp32", "fp16"):
        p = subprocess.Popen([sys.executable, "-c", MEM_PROBE, str(bundle_dir), prec, str(big)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = p.stdout.readline().strip()
            out[prec] = used_mib(p.pid) if line == "ready" else f"failed: {p.stderr.read()[-300:]}"
        finally:
            p.kill()
            p.wait()
    return out


@dataclass
class Served:
    """A server in a container: its URL; its processes are not this host's to count (bench reads no CPU)."""
    url: str

    def pids(self) -> list[int]:
        return []


def start_server(bundle_dir: Path, image: str | None, engine: str, logs: Path):
    env = {"IMGSERVE_MODELS": str(bundle_dir), "IMGSERVE_DEVICE": "cuda"}
    if image is None:
        return launcher.start_service(env, logs / "serve.log", logs / "bentoml_home", timeout_s=400), None
    port = launcher.free_port()
    cid = subprocess.run([engine, "run", "-d", *GPU_RUN_ARGS[engine], "--network=host", "--read-only", "--tmpfs", "/tmp",
                          "-v", f"{bundle_dir.resolve()}:/models/m:ro", "-e", "IMGSERVE_MODELS=/models/m",
                          "-e", "IMGSERVE_DEVICE=cuda", "-e", "BENTOML_HOST=127.0.0.1", "-e", f"BENTOML_PORT={port}",
                          image], check=True, capture_output=True, text=True).stdout.strip()
    server = Served(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 400
    while launcher.http_status(server.url + "/readyz", timeout=3) != 200:
        if time.monotonic() > deadline:
            subprocess.run([engine, "rm", "-f", cid], capture_output=True)
            raise SystemExit(f"the GPU image was not ready in 400 s ({engine} logs {cid})")
        time.sleep(1)
    return server, cid


def throughput(bundle_dir: Path, image: str | None, engine: str, out: Path, batches: list[int],
               concs: list[int], secs: int) -> dict:
    photo = photo_jpegs((640,))[0].data
    inproc = bench.measure_inproc(bundle_dir, "fp32", photo, batches, 3.0, threads=1, device="cuda")
    server, cid = start_server(bundle_dir, image, engine, out)
    try:
        import httpx

        model = httpx.get(server.url + "/models", timeout=10).json()["models"][0]
        served_answer = httpx.post(server.url + "/classify", files={"image": ("p.jpg", photo, "image/jpeg")},
                                   timeout=30).json()
        body, ctype = multipart({}, [("image", ("photo.jpg", photo, "image/jpeg"))])
        (out / "body.bin").write_bytes(body)
        wrk_env = {"BODY_FILE": str(out / "body.bin"), "CONTENT_TYPE": ctype}
        bench.run_wrk(server.url + "/classify", 16, 3, wrk_env)  # warm-up, not counted
        served = bench.measure_server(server, "/classify", wrk_env, concs, secs, metrics=cid is None)
    finally:
        if cid:
            subprocess.run([engine, "rm", "-f", "-t", "5", cid], capture_output=True)
        else:
            server.stop()
    best = max(served, key=lambda r: r.ok_rps)
    return {"model": {k: model[k] for k in ("device", "providers", "max_batch_size")},
            "served_top1": served_answer["predictions"][0]["label"],
            "inproc": [vars(r) for r in inproc.rows], "inproc_best_img_s": inproc.best.full_img_s,
            "inproc_best_batch": inproc.best.batch,
            "served": [{"concurrency": r.concurrency, "ok_rps": r.ok_rps, "p50_ms": r.p50_ms, "errors": r.errors,
                        "mean_batch": r.batch.get("mean")} for r in served],
            "served_best_rps": best.ok_rps, "ratio": best.ok_rps / inproc.best.full_img_s,
            "goal": GOAL, "met": best.ok_rps / inproc.best.full_img_s >= GOAL}


def cpu_top1(bundle_dir: Path) -> str:
    from imgformat.bundle import load_bundle
    from service.backends import create_backend

    b = load_bundle(bundle_dir)
    x = batch_of(b, [photo_jpegs((640,))[0].data])
    logits = create_backend("onnx", b.model_file("onnx", "fp32"), threads=1, device="cpu").run(x)[0]
    return b.manifest["class_names"][int(np.argmax(logits))]


def report_md(r: dict) -> str:
    p, m, t = r["parity"], r["memory_mib"], r["throughput"]
    lines = [f"# GPU check ({r['gpu']}, {r['date']}, commit {r['commit']})", "",
             "| check | result | passed |", "| --- | --- | --- |",
             f"| FP32 CUDA vs CPU ({p['images']} images) | max abs {p['fp32']['max_abs']:.2e}, top-1 "
             f"{p['fp32']['top1_agreement']:.3f} (gate {p['fp32']['gate']}) | {p['fp32']['passed']} |"]
    f16 = p["fp16"]
    lines.append(f"| FP16 CUDA vs CPU FP32 | {f16.get('skipped') or 'max abs %.2e, top-1 %.3f' % (f16['max_abs'], f16['top1_agreement'])}"
                 f" | {f16.get('passed', 'not run')} |")
    lines.append(f"| served top-1 = CPU top-1 | {t['served_top1']} vs {r['cpu_top1']} | {t['served_top1'] == r['cpu_top1']} |")
    lines.append(f"| served best / in-process best | {t['served_best_rps']:.0f} req/s / {t['inproc_best_img_s']:.0f} img/s "
                 f"(batch {t['inproc_best_batch']}) = {t['ratio']:.2f}x (goal >= {GOAL}) | {t['met']} |")
    lines += ["", "GPU memory per process (MiB, nvidia-smi): " + ", ".join(f"{k} {v}" for k, v in m.items()),
              "", "In-process ORT-CUDA (decode + preprocess + ORT):", "",
              "| batch | ORT img/s | full img/s |", "| --- | --- | --- |"]
    lines += [f"| {row['batch']} | {row['ort_img_s']:.0f} | {row['full_img_s']:.0f} |" for row in t["inproc"]]
    lines += ["", f"Served ({t['model']}):", "", "| concurrency | ok req/s | p50 ms | mean batch | errors |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {s['concurrency']} | {s['ok_rps']:.0f} | {s['p50_ms']} | {s['mean_batch']} | {s['errors']} |"
              for s in t["served"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle with model.onnx (and model.fp16.onnx)")
    ap.add_argument("--image", default=None, help="serve through this GPU image instead of `bentoml serve`")
    ap.add_argument("--engine", default="podman", choices=sorted(GPU_RUN_ARGS), help="engine for --image")
    ap.add_argument("--out", type=Path, default=Path("build/gpu-check"), help="report folder")
    ap.add_argument("--batches", default="1,8,32,64", help="in-process batch sizes")
    ap.add_argument("--concurrency", default="16,64,128", help="wrk concurrencies")
    ap.add_argument("--duration", type=int, default=10, help="seconds per concurrency")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[gpu-check] %(message)s")
    from service.backends import cuda_device_count

    if cuda_device_count() == 0:
        raise SystemExit("no CUDA device: this check runs on a GPU host (docs/container.md, 'The GPU check')")
    for tool in ("nvidia-smi", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing")
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    r = {"gpu": gpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit}
    r["parity"] = parity(a.bundle)
    log.info("parity: %s", json.dumps(r["parity"]))
    r["cpu_top1"] = cpu_top1(a.bundle)
    batches = [int(b) for b in a.batches.split(",")]
    r["memory_mib"] = gpu_memory(a.bundle, max(batches))
    log.info("GPU memory (MiB): %s", r["memory_mib"])
    r["throughput"] = throughput(a.bundle, a.image, a.engine, a.out, batches,
                                 [int(c) for c in a.concurrency.split(",")], a.duration)
    r["seconds"] = time.monotonic() - t0
    (a.out / "gpu-check.json").write_text(json.dumps(r, indent=2, default=str))
    (a.out / "gpu-check.md").write_text(report_md(r))
    print(report_md(r))
    print(f"[gpu-check] {r['seconds']:.0f} s; report: {a.out / 'gpu-check.md'}")
    ok = r["parity"]["fp32"]["passed"] and r["parity"]["fp16"].get("passed", True) and r["cpu_top1"] == r["throughput"]["served_top1"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
