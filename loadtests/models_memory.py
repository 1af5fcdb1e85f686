"""Memory of many models, and of loading/unloading them through the OIP model repository API.

    .venv/bin/python -m loadtests.models_memory --bundle bundles/r18 --copies 8 --cycles 20

1. Serves the bundle once, then ``--copies`` times (``IMGSERVE_MODELS=m1=DIR,...``): resident
   memory of the service's processes (``bentoml serve`` supervisor + worker) and seconds to ready;
   the difference per extra model, against the model file's size.
2. Serves it once with ``IMGSERVE_MODEL_CONTROL=explicit`` and answers one request, then
   ``--cycles`` times: load a second copy (``POST /v2/repository/models/extra/load``), one
   inference on it, unload it. Prints each load's seconds and the RSS before, after the first cycle
   and after the last one.
Prints one JSON document at the end (figures for docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import urllib.request
from pathlib import Path

from loadtests import servectl

log = logging.getLogger(__name__)


def _post(url: str, doc: dict | None = None, body: bytes | None = None, headers: dict | None = None) -> dict:
    data = body if body is not None else json.dumps(doc or {}).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers=headers or {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read()
    return json.loads(text[:int(r.headers.get("Inference-Header-Content-Length", len(text)))])


def _infer(url: str, model: str, image: bytes) -> None:
    _post(f"{url}/v2/models/{model}/infer", body=image, headers={"Inference-Header-Content-Length": "0"})


def serve_copies(bundle: Path, copies: int, port: int, out: Path) -> dict:
    """RSS and time to ready of the service serving ``copies`` names for the same bundle."""
    spec = ",".join(f"m{i + 1}={bundle.resolve()}" for i in range(copies))
    srv = servectl.service_server([str(bundle)], port, out / f"serve-{copies}.log", {"IMGSERVE_MODELS": spec})
    with srv.start():
        ready_s = srv.wait_ready()
        time.sleep(2.0)
        rss = servectl.rss_mib(srv.pids())
    log.info("%d model(s): %.0f MiB RSS, ready in %.1f s", copies, rss, ready_s)
    return {"copies": copies, "rss_mib": round(rss, 1), "ready_s": round(ready_s, 2)}


def load_cycles(bundle: Path, cycles: int, port: int, out: Path, image: bytes) -> dict:
    srv = servectl.service_server([str(bundle)], port, out / "serve-cycles.log",
                                  {"IMGSERVE_MODELS": f"base={bundle.resolve()}", "IMGSERVE_MODEL_CONTROL": "explicit"})
    loads, rss = [], []
    with srv.start():
        srv.wait_ready()
        _infer(srv.url, "base", image)
        rss.append(servectl.rss_mib(srv.pids()))
        for i in range(cycles):
            t0 = time.perf_counter()
            _post(f"{srv.url}/v2/repository/models/extra/load", {"parameters": {"bundle": str(bundle.resolve())}})
            loads.append(time.perf_counter() - t0)
            _infer(srv.url, "extra", image)
            _post(f"{srv.url}/v2/repository/models/extra/unload")
            rss.append(servectl.rss_mib(srv.pids()))
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from loadtests.payloads import sample_photo_path

    args.out.mkdir(parents=True, exist_ok=True)
    image = Path(args.image or sample_photo_path()).read_bytes()
    model_mib = (args.bundle / "model.onnx").stat().st_size / 2**20
    one = serve_copies(args.bundle, 1, servectl.free_port(), args.out)
    many = serve_copies(args.bundle, args.copies, servectl.free_port(), args.out)
    per_extra = (many["rss_mib"] - one["rss_mib"]) / max(args.copies - 1, 1)
    result = {"model_file_mib": round(model_mib, 1), "one": one, "many": many,
              "rss_per_extra_model_mib": round(per_extra, 1), "per_extra_vs_file": round(per_extra / model_mib, 2),
              "repository": load_cycles(args.bundle, args.cycles, servectl.free_port(), args.out, image)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
