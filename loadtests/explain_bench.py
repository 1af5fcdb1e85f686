"""What explanations cost, in one run on one server (docs/explain.md has the figures).

Serves each model twice, exported with and without the CAM output (``--no-explain``), and runs wrk
in interleaved rounds: /classify on both bundles (the output present must cost /classify nothing:
the service asks onnxruntime for the logits alone), and /explain against /classify on the
explainable one, at each concurrency. Prints one table with the load average of each round.

  python -m loadtests.explain_bench --bundle r18=bundles/r18 --plain r18-plain=bundles/r18-plain \
      --image photo.png --conc 1,32 --seconds 8 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from loadtests.bench import parse_wrk, run_wrk
from service import launcher

KEY = "explain-bench"


def form(image: bytes, model: str) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", required=True, help="NAME=DIR of a bundle with explanations")
    p.add_argument("--plain", action="append", required=True, help="NAME=DIR of the same model with --no-explain")
    p.add_argument("--image", action="append", required=True, help="one PNG per --bundle, in order")
    p.add_argument("--conc", default="1,32")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each measurement")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="extra server setting, e.g. IMGSERVE_MAX_LATENCY_MS=10000 so c=32 on ResNet-18 is not shed")
    a = p.parse_args(argv)
    concs = [int(c) for c in a.conc.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="explain-bench."))
    env = {"IMGSERVE_MODELS": ",".join(a.bundle + a.plain), "IMGSERVE_API_KEY": KEY,
           **dict(kv.split("=", 1) for kv in a.env)}
    server = launcher.start_service(env, tmp / "serve.log", tmp / "home")
    rows: dict[tuple, list[tuple[float, float, float, float]]] = {}
    try:
        cases = []
        for spec, plain, image in zip(a.bundle, a.plain, a.image):
            name, pname, data = spec.split("=")[0], plain.split("=")[0], Path(image).read_bytes()
            cases += [("/classify", name, data), ("/classify", pname, data), ("/explain", name, data)]
        for rnd in range(a.rounds):
            for c in concs:
                # Odd rounds run the cases backwards, and each waits for the server to drain the
                # previous one's queue: otherwise the first case of a round always follows the
                # heaviest one (ResNet-18 /explain at high c) and pays for its backlog.
                for path, model, data in (cases if rnd % 2 == 0 else cases[::-1]):
                    time.sleep(a.settle)
                    body, ctype = form(data, model)
                    f = tmp / f"{model}.bin"
                    f.write_bytes(body)
                    load = loadavg()
                    r = parse_wrk(run_wrk(server.url + path, c, a.seconds,
                                          {"BODY_FILE": str(f), "CONTENT_TYPE": ctype, "API_KEY": KEY}), c)
                    rows.setdefault((model, path, c), []).append((r.ok_rps, r.p50_ms or 0, r.p99_ms or 0, load))
                    print(f"round {rnd + 1} c={c:<3d} {path:10s} {model:14s} {r.ok_rps:8.1f} ok/s  "
                          f"p50 {r.p50_ms or 0:7.2f} ms  p99 {r.p99_ms or 0:7.2f} ms  errors "
                          f"{r.requests - r.ok}  load {load:.2f}", flush=True)
    finally:
        server.stop()
    print("\nmedian over rounds: model, route, c, ok req/s, p50 ms, p99 ms, load")
    summary = {}
    for (model, path, c), vals in rows.items():
        med = [statistics.median(v[i] for v in vals) for i in range(4)]
        summary[f"{model} {path} c={c}"] = med
        print(f"{model:14s} {path:10s} c={c:<3d} {med[0]:8.1f} {med[1]:8.2f} {med[2]:8.2f}  load {med[3]:.2f}")
    for spec, plain in zip(a.bundle, a.plain):
        name, pname = spec.split("=")[0], plain.split("=")[0]
        for c in concs:
            with_out, without = rows[(name, "/classify", c)], rows[(pname, "/classify", c)]
            ratio = [w[0] / o[0] for w, o in zip(with_out, without) if o[0]]
            print(f"{name}: /classify with/without the CAM output at c={c}: per-round ratios "
                  f"{', '.join(f'{x:.3f}' for x in ratio)}, median {statistics.median(ratio):.3f}")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
