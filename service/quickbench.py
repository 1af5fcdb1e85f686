"""Quick serving benchmark (a script, not a test): req/s and p50/p99 at concurrency 1 and 32.

    .venv/bin/python -m service.quickbench                       # default model + ResNet-18 224 px
    .venv/bin/python -m service.quickbench --batchers eager,bentoml --seconds 10

For each model it measures, in the same run on the same machine:
  - in-process: decode + preprocess (the service's own code) + onnxruntime, single image and batch 16,
    and onnxruntime alone, in img/s; the single-image in-process latency;
  - served: ``bentoml serve`` on 127.0.0.1, driven by ``wrk`` (low overhead, C) with a multipart
    POST /classify of a real image, at concurrency 1 and 32; non-2xx counted.
Models: ``--default-bundle`` (bundles/default from ``make serve``; when missing, a simple_cnn
28 px grey bundle with untrained weights is exported: timing does not depend on weights) and a
torchvision ResNet-18 (10 classes, 224 px, untrained weights) on sklearn's china.jpg (640x427 JPEG).
Everything generated goes under ``--work`` (default /tmp/imgserve-quickbench). Needs wrk (apt).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


# -- bundles ---------------------------------------------------------------------------------------
def _untrained_bundle(work: Path, arch: str, channels: int, size: int, policy: str) -> Path:
    """Export an untrained ``arch`` through the real exporter (random parity samples: timing only)."""
    out = work / f"{arch}_{size}"
    if (out / "manifest.json").is_file():
        return out
    import torch

    from export import export_bundle
    from training.checkpoint import save_checkpoint
    from training.models import build_model
    from training.transforms import make_preprocess

    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": channels, "input_size": size, "head": [], "dropout": 0.0}
    model = build_model(arch, **kwargs).eval()
    mean, std = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if channels == 3 else ([0.286], [0.353])
    pre = make_preprocess(channels=channels, input_size=size, mean=mean, std=std, resize_policy=policy)
    ckpt = save_checkpoint(work / f"{arch}_{size}.pt", {
        "model": {"name": arch, "kwargs": kwargs}, "num_classes": 10, "in_channels": channels, "input_size": size,
        "preprocess": pre, "class_names": [f"class{i}" for i in range(10)], "dataset": {"name": "none"},
        "state_dict": model.state_dict(), "epoch": 0, "best_val_acc": 0.0, "metrics": {}, "config": {}})
    return export_bundle(ckpt, out, name=arch.replace("_", "-"), version="bench", samples=8, force=True)


def _sample_payloads(work: Path) -> tuple[bytes, bytes]:
    """A 28x28 grey PNG (a Fashion-MNIST test image when installed, else a digit) and china.jpg."""
    from PIL import Image
    from sklearn.datasets import load_sample_image  # noqa: F401  (makes sure the photo exists)
    import sklearn

    jpg = (Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg").read_bytes()
    fm = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    if fm.is_file():
        import gzip

        raw = gzip.open(fm).read()
        arr = np.frombuffer(raw, np.uint8, offset=16)[: 28 * 28].reshape(28, 28)
    else:
        from sklearn.datasets import load_digits

        arr = np.asarray(Image.fromarray((load_digits().images[0] * 15).astype(np.uint8)).resize((28, 28)))
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue(), jpg


# -- in-process reference --------------------------------------------------------------------------
def in_process(bundle: Path, payload: bytes, seconds: float) -> dict[str, float]:
    """decode+preprocess+ORT (batch 1 and 16) and ORT alone, with the service's own code."""
    from service.backends import cpu_count, create_backend
    from service.bundle import load_bundle
    from service.preprocess import Preprocessor

    b = load_bundle(bundle)
    pre = Preprocessor.from_manifest(b.manifest["preprocessing"], max_pixels=40_000_000)
    be = create_backend("onnx", b.model_file("onnx", "fp32"), threads=cpu_count())
    x1 = pre(payload)[None]
    res: dict[str, float] = {}

    def loop(fn, per_call: int) -> tuple[float, list[float]]:
        fn()
        times, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return per_call * len(times) / sum(times), times

    res["pre_ms"] = 1e3 / loop(lambda: pre(payload), 1)[0]
    cpu0 = time.process_time()
    res["ort1_ips"], t = loop(lambda: be.run(x1), 1)
    res["ort1_cpu_ms"] = (time.process_time() - cpu0) * 1e3 / (len(t) + 1)
    x16 = np.repeat(x1, 16, axis=0)
    res["ort16_ips"], _ = loop(lambda: be.run(x16), 16)
    res["full1_ips"], t1 = loop(lambda: be.run(pre(payload)[None]), 1)
    res["full1_p50_ms"] = statistics.median(t1) * 1e3
    res["full16_ips"], _ = loop(lambda: be.run(np.stack([pre(payload) for _ in range(16)])), 16)
    return res


# -- served ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(bundle: Path, batcher: str, log: Path, home: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "IMGSERVE_MODELS": str(bundle), "IMGSERVE_BATCHER": batcher, "BENTOML_HOME": str(home),
           "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve", "service.service:ImgServe",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        try:
            if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"server not ready; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


LUA = """local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
"""


def _unit_ms(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", v)
    num, unit = float(m.group(1)), m.group(2)
    return num * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, body: Path, ctype: str, conc: int, seconds: int, lua: Path) -> dict[str, float]:
    env = {**os.environ, "BODY_FILE": str(body), "CONTENT_TYPE": ctype}
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{seconds}s", "--latency", "--timeout", "30s", "-s", str(lua),
                          url + "/classify"], env=env, capture_output=True, text=True, timeout=seconds + 60).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    dur = _unit_ms(re.search(r"requests in ([\d.]+\w+),", out).group(1)) / 1e3
    bad = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return {"c": conc, "ok_rps": (total - bad) / dur, "p50_ms": _unit_ms(pct["50"]), "p99_ms": _unit_ms(pct["99"]),
            "non2xx": bad, "socket_errors": errs}


def _multipart(payload: bytes, filename: str, work: Path) -> tuple[Path, str]:
    boundary = "imgservebench"
    ctype = "image/jpeg" if filename.endswith(".jpg") else "image/png"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    path = work / f"body_{filename}"
    path.write_bytes(body)
    return path, f"multipart/form-data; boundary={boundary}"


def _server_cpu_s(proc: subprocess.Popen) -> float:
    """User + system CPU seconds of the server and its workers (BentoML starts the worker in its own session)."""
    import psutil

    root = psutil.Process(proc.pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _batch_sizes(url: str) -> str:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    s = sum(float(v) for v in re.findall(r"^imgserve_batch_size_sum\{[^}]*\} (\S+)", text, re.M))
    n = sum(float(v) for v in re.findall(r"^imgserve_batch_size_count\{[^}]*\} (\S+)", text, re.M))
    return f"{s / n:.1f}" if n else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default-bundle", default=str(ROOT / "bundles" / "default"))
    ap.add_argument("--work", default="/tmp/imgserve-quickbench")
    ap.add_argument("--batchers", default="eager", help="comma list of IMGSERVE_BATCHER values to compare")
    ap.add_argument("--seconds", type=int, default=10, help="wrk duration per concurrency")
    ap.add_argument("--models", default="default,resnet18", help="which of: default, resnet18")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("wrk") is None:
        print("wrk is missing: `sudo apt-get install wrk` (make setup installs it)")
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    png, jpg = _sample_payloads(work)
    lua = work / "post.lua"
    lua.write_text(LUA)
    cases = []
    if "default" in args.models:
        d = Path(args.default_bundle)
        if not (d / "manifest.json").is_file():
            logger.info("no bundle at %s: exporting an untrained simple_cnn 28 px (timing only)", d)
            d = _untrained_bundle(work, "simple_cnn", 1, 28, "stretch")
        cases.append(("default " + d.name, d, png, "fmnist.png"))
    if "resnet18" in args.models:
        cases.append(("resnet18 224px", _untrained_bundle(work, "resnet18", 3, 224, "shorter_side_center_crop"),
                      jpg, "china.jpg"))
    rows: list[dict[str, Any]] = []
    for label, bundle, payload, fname in cases:
        ref = in_process(bundle, payload, seconds=3.0)
        print(f"\n{label}: in-process (same code as the service): preprocess {ref['pre_ms']:.2f} ms/img; "
              f"ORT alone {ref['ort1_ips']:.0f} img/s (batch 1, {ref['ort1_cpu_ms']:.2f} CPU ms/img), {ref['ort16_ips']:.0f} img/s (batch 16); "
              f"decode+preprocess+ORT {ref['full1_ips']:.0f} img/s (batch 1, p50 {ref['full1_p50_ms']:.2f} ms), "
              f"{ref['full16_ips']:.0f} img/s (batch 16)", flush=True)
        body, ctype = _multipart(payload, fname, work)
        best_ref = max(ref["full1_ips"], ref["full16_ips"])
        for batcher in args.batchers.split(","):
            proc, url = _start(bundle, batcher, work / f"serve_{batcher}.log", work / "bentoml_home")
            try:
                wrk(url, body, ctype, 8, 3, lua)  # warm-up
                for conc in (1, 32):
                    cpu0 = _server_cpu_s(proc)
                    r = wrk(url, body, ctype, conc, args.seconds, lua)
                    done = r["ok_rps"] * args.seconds + r["non2xx"]
                    r["cpu_ms_per_req"] = (_server_cpu_s(proc) - cpu0) * 1e3 / max(done, 1)
                    r.update(model=label, batcher=batcher, ratio=r["ok_rps"] / best_ref,
                             over_inproc_ms=r["p50_ms"] - ref["full1_p50_ms"], mean_batch=_batch_sizes(url))
                    rows.append(r)
                    print(f"  {batcher:8s} c={conc:<3d} {r['ok_rps']:7.1f} ok req/s  p50 {r['p50_ms']:7.2f} ms "
                          f"(+{r['over_inproc_ms']:.2f} over in-process)  p99 {r['p99_ms']:7.2f} ms  "
                          f"non-2xx {r['non2xx']}  {r['ratio']:.2f}x in-process best  server CPU {r['cpu_ms_per_req']:.2f} ms/req  "
                          f"mean batch so far {r['mean_batch']}",
                          flush=True)
            finally:
                _stop(proc)
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nresults: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
