"""How many requests after a shift until the drift score crosses the threshold (docs/monitoring.md).

    .venv/bin/python -m loadtests.drift_detect --bundle BUNDLE --checkpoint best.pt [--shift inverted]

Starts the service on the bundle (default window settings unless --env), fills the model's drift
window with held-out validation images of the checkpoint's dataset (cycled: in distribution), then
sends shifted images (``inverted``: 255 - pixels; ``oneclass``: only images of the class the model
predicts most) one request of ``--step`` images at a time and reads ``GET /models`` after each: the
first request count at which each signal's PSI passes ``--threshold``. /models rescores on every
read; the gauge Prometheus scrapes is rescored every 100 predictions or 5 s (service/monitoring.py),
so an alert sees the crossing up to that much later, plus its scrape interval and ``for``.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import tempfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.launcher import start_service

SHIFTS = {"inverted": lambda imgs, top1: [255 - a for a in imgs],
          "oneclass": lambda imgs, top1: [a for a, t in zip(imgs, top1) if t == max(set(top1), key=top1.count)]}


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def classify(url: str, images: list[np.ndarray]) -> list[int]:
    files = [("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(images)]
    r = httpx.post(url + "/classify_batch", files=files, timeout=60)
    r.raise_for_status()
    return [res["predictions"][0]["index"] for res in r.json()["results"]]


def drift(url: str) -> dict:
    return httpx.get(url + "/models", timeout=30).json()["models"][0]["drift"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.drift_detect", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True, help="its dataset's val split is the normal traffic")
    ap.add_argument("--shift", choices=sorted(SHIFTS), action="append")
    ap.add_argument("--step", type=int, default=10, help="images per request after the shift")
    ap.add_argument("--threshold", type=float, default=0.25)
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="e.g. IMGSERVE_DRIFT_WINDOW=1000")
    a = ap.parse_args(argv)
    from export.samples import from_dataset
    from training.checkpoint import load_checkpoint

    val = list(from_dataset(load_checkpoint(a.checkpoint), "val", 10_000, seed=1).images)
    results = {}
    for shift in a.shift or sorted(SHIFTS):
        with tempfile.TemporaryDirectory() as tmp:
            srv = start_service({"IMGSERVE_MODELS": str(a.bundle), "IMGSERVE_MAX_LATENCY_MS": "20000",
                                 **dict(kv.split("=", 1) for kv in a.env)}, Path(tmp) / "serve.log", Path(tmp) / "home")
            try:
                results[shift] = run_shift(srv.url, val, shift, a.step, a.threshold)
            finally:
                srv.stop()
        print(shift, json.dumps(results[shift]))
    return 0


def run_shift(url: str, val: list[np.ndarray], shift: str, step: int, threshold: float) -> dict:
    window = drift(url)["window"]["max_samples"]
    cycled = list(itertools.islice(itertools.cycle(val), window))
    top1 = []
    for i in range(0, window, 32):
        top1 += classify(url, cycled[i:i + 32])
    before = drift(url)["scores"]
    shifted, sent, crossed = SHIFTS[shift](val, top1[:len(val)]), 0, {}
    for batch in itertools.cycle([shifted[i:i + step] for i in range(0, len(shifted), step)]):
        classify(url, batch)
        sent += len(batch)
        scores = drift(url)["scores"]
        crossed.update({s: sent for s, v in scores.items() if v["psi"] > threshold and s not in crossed})
        if len(crossed) == len(scores) or sent >= window:
            break
    return {"window": window, "before_psi": {s: round(v["psi"], 4) for s, v in before.items()},
            "images_until_psi_over_threshold": crossed, "sent": sent}


if __name__ == "__main__":
    raise SystemExit(main())
