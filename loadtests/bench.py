"""Benchmark: how close the served model comes to the in-process limit, in one run on one machine.

    .venv/bin/python -m loadtests.bench --bundle bundles/default
    .venv/bin/python -m loadtests.bench --bundle bundles/r18 --image china --precision int8 --duration 20s

1. In-process limit (no HTTP): decode + preprocess (the one pipeline, ``imgformat.preprocess``) +
   onnxruntime (the service's own backend settings) at batch sizes 1..32, and onnxruntime alone,
   in img/s, with onnxruntime's CPU time per image.
2. Starts the service (`bentoml serve`, its own session on a free 127.0.0.1 port) and drives it with
   wrk (Debian's; `wrk_post.lua` posts one prebuilt multipart body and counts answers by status) at
   each concurrency for a bounded time. Two HTTP floors at the same concurrencies: the same POST
   to ``loadtests/floor_service.py`` (our service's HTTP stack, guard and multipart parsing, which
   answers without decoding or a model: the trivial endpoint, what any model could be served at
   through this stack) and GET /livez on the service itself (BentoML's cheapest route). Around each
   run it reads /metrics (batch sizes formed) and the CPU counters of every process of the service
   (/proc/PID/stat).
3. Prints a table (req/s counting 2xx only, p50, p99, errors, mean batch and batch-size shares,
   ratio served / in-process limit, ratio served / trivial-endpoint floor, server CPU ms per request next to
   onnxruntime's CPU ms per image) and saves bench.json, table.txt and a PNG plot of throughput and
   latency against concurrency into loadtests/results/bench-RUN/.

`--server-cmd CMD --url URL` measures any other server the same way (the peers' start.sh scripts),
with the same body, wrk settings and CPU accounting. Figures are noisy on a shared machine: compare
only within one run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loadtests.payloads import multipart, sample_photo_path
from loadtests.run import parse_duration
from service import launcher

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
LUA = HERE / "wrk_post.lua"
SETTLE_S = 2.0


# --- 1. the in-process limit ------------------------------------------------------------------
@dataclass
class InprocRow:
    batch: int
    ort_img_s: float             # onnxruntime alone
    ort_cpu_ms_per_img: float    # process CPU time (all threads) per image, onnxruntime alone
    full_img_s: float            # decode + preprocess + onnxruntime + top-k, one thread after another
    full_ms_per_batch: float


@dataclass
class Inproc:
    model_file: str
    preprocess_ms: float         # decode + preprocess alone, one image, one thread
    rows: list[InprocRow]

    @property
    def best(self) -> InprocRow:
        return max(self.rows, key=lambda r: r.full_img_s)

    @property
    def single_latency_ms(self) -> float:
        return next(r.full_ms_per_batch for r in self.rows if r.batch == 1)


def _timed_loop(fn, secs: float, min_iters: int = 3) -> tuple[int, float, float]:
    """Call fn() for about `secs`; returns (iterations, wall seconds, process CPU seconds)."""
    fn()   # warm
    it, w0, c0 = 0, time.perf_counter(), time.process_time()
    while it < min_iters or time.perf_counter() - w0 < secs:
        fn()
        it += 1
    return it, time.perf_counter() - w0, time.process_time() - c0


def _top_k(logits: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """Softmax + top-k per row, as a server answers (kept in the loop so the comparison is fair)."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1)[:, :k]
    return [[(int(i), float(p[r, i])) for i in row] for r, row in enumerate(idx)]


def measure_inproc(bundle: Path, precision: str, image: bytes, batches: list[int], secs: float,
                   threads: int, device: str = "cpu") -> Inproc:
    """The limit without HTTP, with the service's own bundle reader, preprocessing and backend."""
    try:
        from service.backends import create_backend
        from imgformat.bundle import load_bundle
        from imgformat.preprocess import Preprocessor
    except ImportError as e:
        raise SystemExit(f"the service package is not importable ({e}); run from the repository root after make setup")
    b = load_bundle(bundle)
    model_file = b.model_file("onnx", precision)
    pre = Preprocessor.from_manifest(b.manifest["preprocessing"], max_pixels=400_000_000)
    backend = create_backend("onnx", model_file, threads=threads, device=device)
    n, wall, _ = _timed_loop(lambda: pre(image), secs / 2)
    pre_ms = wall / n * 1e3
    log.info("in-process: %s, decode+preprocess %.2f ms/img on one thread", model_file.name, pre_ms)
    rows = []
    one = pre(image)   # (H, W, C) uint8
    for bs in batches:
        x = np.ascontiguousarray(np.broadcast_to(one, (bs, *one.shape)))
        it, wall, cpu = _timed_loop(lambda: backend.run(x), secs)
        ort_ips, ort_cpu = it * bs / wall, cpu / (it * bs) * 1e3
        it2, wall2, _ = _timed_loop(lambda: _top_k(backend.run(np.stack([pre(image) for _ in range(bs)]))), secs)
        row = InprocRow(bs, ort_ips, ort_cpu, it2 * bs / wall2, wall2 / it2 * 1e3)
        log.info("in-process batch %2d: ORT alone %7.1f img/s (%5.2f CPU ms/img)  decode+pre+ORT %7.1f img/s",
                 bs, row.ort_img_s, row.ort_cpu_ms_per_img, row.full_img_s)
        rows.append(row)
    return Inproc(model_file.name, pre_ms, rows)


# --- 2. HTTP runs with wrk ------------------------------------------------------------------
@dataclass
class WrkResult:
    concurrency: int
    seconds: float
    requests: int
    statuses: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    socket_errors: int
    cpu_s: float = 0.0                                   # server CPU time over the run (all its processes)
    batch: dict[str, float] = field(default_factory=dict)  # from /metrics: mean and shares
    stages_ms: dict[str, float] = field(default_factory=dict)  # from /metrics: mean ms of each timed stage

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.startswith("2"))

    @property
    def ok_rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.requests - self.ok + self.socket_errors

    @property
    def error_detail(self) -> str:
        """Non-2xx answers by status and socket errors, e.g. '503:20 sock:3'."""
        parts = [f"{s}:{n}" for s, n in sorted(self.statuses.items()) if not s.startswith("2")]
        return " ".join(parts + ([f"sock:{self.socket_errors}"] if self.socket_errors else []))

    @property
    def cpu_ms_per_req(self) -> float | None:
        """Server CPU per answered request (any status)."""
        return self.cpu_s / self.requests * 1e3 if self.requests else None

    @property
    def cpu_ms_per_ok(self) -> float | None:
        """Server CPU per 2xx answer: what a served classification costs when some requests were refused."""
        return self.cpu_s / self.ok * 1e3 if self.ok else None


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def publish(text: str, path: Path) -> None:
    """Print a result table and keep it next to the run's other files."""
    print(text)
    path.write_text(text + "\n")
    print(f"\nresults: {path.parent}")


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str, concurrency: int) -> WrkResult:
    """wrk --latency output (with wrk_post.lua's STATUS_JSON line) -> WrkResult."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not m:
        raise ValueError(f"wrk printed no request count:\n{out[-500:]}")
    requests, seconds = int(m.group(1)), _ms(m.group(2) + m.group(3)) / 1e3
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    sm = re.search(r"^STATUS_JSON (\{.*\})$", out, re.M)
    statuses = json.loads(sm.group(1)) if sm else {}
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    sock = sum(int(g) for g in se.groups()) if se else 0
    if not statuses and requests:   # no Lua counts: fall back to wrk's own non-2xx line
        non2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        bad = int(non2.group(1)) if non2 else 0
        statuses = {"200": requests - bad, **({"other": bad} if bad else {})}
    return WrkResult(concurrency, seconds, requests, statuses, _ms(pct["50"]) if "50" in pct else None,
                     _ms(pct["99"]) if "99" in pct else None, sock)


def scrape(url: str, tries: int = 3) -> str:
    """GET /metrics text ("" when it cannot be read: the table then shows no batch sizes)."""
    for i in range(tries):
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=30) as r:
                return r.read().decode()
        except OSError as e:   # a busy server may answer slowly right after a run
            log.warning("GET /metrics failed (%s)%s", e, "; retrying" if i + 1 < tries else "")
            time.sleep(1)
    return ""


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def histogram(text: str, family: str) -> dict[str, float]:
    """Prometheus text -> {le: cumulative count, "_sum": s, "_count": n} for `family`, summed over labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not m.group(1).startswith(family):
            continue
        name, labels, value = m.groups()
        if name == family + "_bucket":
            le = re.search(r'le="([^"]+)"', labels or "")
            if le:
                out[le.group(1)] = out.get(le.group(1), 0.0) + float(value)
        elif name in (family + "_sum", family + "_count"):
            key = name[len(family):]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def batch_stats(before: str, after: str, family: str = "imgserve_batch_size") -> dict[str, float]:
    """Batches formed between two scrapes: mean size and the share of images in each size range."""
    h0, h1 = histogram(before, family), histogram(after, family)
    if not h1:
        return {}
    d = {k: h1.get(k, 0.0) - h0.get(k, 0.0) for k in h1}
    batches = d.get("_count", 0.0)
    if batches <= 0:
        return {"batches": 0.0}
    les = sorted((float(k), k) for k in d if not k.startswith("_"))
    stats = {"batches": batches, "mean": d.get("_sum", 0.0) / batches}
    prev, prev_le = 0.0, 0.0
    for le, key in les:
        n = d[key] - prev
        if n > 0:
            label = f"{int(prev_le) + 1}-{int(le)}" if le != float("inf") else f">{int(prev_le)}"
            if le != float("inf") and int(prev_le) + 1 == int(le):
                label = str(int(le))
            stats[f"share_batches_{label}"] = n / batches
        prev, prev_le = d[key], le
    return stats


# The service's own timers (service/metrics.py): mean milliseconds per observation over a run.
STAGE_FAMILIES = {"queue": "imgserve_queue_seconds", "preprocess": "imgserve_preprocess_seconds",
                  "inference_per_batch": "imgserve_inference_seconds"}


def stage_means(before: str, after: str) -> dict[str, float]:
    """Mean ms per observation of each timed stage between two scrapes (stages the service lacks are left out)."""
    out = {}
    for key, fam in STAGE_FAMILIES.items():
        h0, h1 = histogram(before, fam), histogram(after, fam)
        n = h1.get("_count", 0.0) - h0.get("_count", 0.0)
        if n > 0:
            out[key] = (h1.get("_sum", 0.0) - h0.get("_sum", 0.0)) / n * 1e3
    return out


def run_wrk(url: str, concurrency: int, duration_s: int, env: dict[str, str], method: str = "POST") -> str:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--latency", "--timeout", "30s", "-s", str(LUA), url]
    p = subprocess.run(cmd, env={**os.environ, **env, "METHOD": method}, capture_output=True, text=True,
                       timeout=duration_s + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr.strip()[-300:]}")
    return p.stdout


def measure_server(server: launcher.Server, path: str, body_env: dict[str, str], concs: list[int], duration_s: int,
                   method: str = "POST", metrics: bool = True) -> list[WrkResult]:
    """wrk at each concurrency; CPU counters and /metrics read around each run."""
    url = server.url.rstrip("/") + path
    results = []
    for c in concs:
        time.sleep(SETTLE_S)   # let the previous run's in-flight requests finish before reading the counters
        m0 = scrape(server.url) if metrics else ""
        cpu0 = launcher.cpu_seconds(server.pids())
        out = run_wrk(url, c, duration_s, body_env, method)
        cpu1 = launcher.cpu_seconds(server.pids())
        m1 = scrape(server.url) if metrics else ""
        r = parse_wrk(out, c)
        r.cpu_s = cpu1 - cpu0
        r.batch = batch_stats(m0, m1) if metrics else {}
        r.stages_ms = stage_means(m0, m1) if metrics else {}
        log.info("%s %s c=%-3d %7.1f ok req/s  p50 %7.1f ms  p99 %7.1f ms  errors %d  %s", method, path, c,
                 r.ok_rps, r.p50_ms or 0, r.p99_ms or 0, r.errors,
                 f"mean batch {r.batch['mean']:.1f}" if r.batch.get("mean") else "")
        results.append(r)
    return results


def wrk_table(title: str, results: list["WrkResult"]) -> str:
    """Compact table of one series of wrk runs (used for the HTTP floor)."""
    lines = [title, f"{'conc':>4} {'ok req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'CPU ms/req':>10}"]
    lines += [f"{r.concurrency:>4} {r.ok_rps:>9.1f} {_f(r.p50_ms):>8} {_f(r.p99_ms):>8} {r.errors:>7} "
              f"{_f(r.cpu_ms_per_req, '.2f'):>10}" for r in results]
    return "\n".join(lines)


# --- 3. report --------------------------------------------------------------------------------
def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _ort_cpu_near(inproc: Inproc | None, batch: float | None) -> InprocRow | None:
    if inproc is None:
        return None
    b = batch or 1.0
    return min(inproc.rows, key=lambda r: abs(np.log(r.batch) - np.log(max(b, 1.0))))


def format_table(label: str, served: list[WrkResult], floor: list[WrkResult], inproc: Inproc | None,
                 livez: list[WrkResult] = ()) -> str:
    lines = [f"== {label}"]
    if inproc:
        best = inproc.best
        lines += [f"in-process limit ({inproc.model_file}): decode+pre+ORT {best.full_img_s:.1f} img/s at batch "
                  f"{best.batch}; ORT alone best {max(r.ort_img_s for r in inproc.rows):.1f} img/s; "
                  f"single image {inproc.single_latency_ms:.1f} ms; decode+preprocess {inproc.preprocess_ms:.2f} ms/img",
                  "", f"{'batch':>5} {'ORT img/s':>10} {'ORT CPU ms/img':>15} {'full img/s':>11} {'full ms/batch':>14}"]
        lines += [f"{r.batch:>5} {r.ort_img_s:>10.1f} {r.ort_cpu_ms_per_img:>15.2f} {r.full_img_s:>11.1f} "
                  f"{r.full_ms_per_batch:>14.1f}" for r in inproc.rows]
        lines.append("")
    fl = {r.concurrency: r for r in floor}
    lines.append(f"{'conc':>4} {'ok req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'x limit':>8} "
                 f"{'floor/s':>8} {'x floor':>8} {'CPU ms/ok':>10} {'ORT CPU ms':>10} {'mean bs':>7}  batch sizes")
    for r in served:
        f = fl.get(r.concurrency)
        near = _ort_cpu_near(inproc, r.batch.get("mean"))
        shares = " ".join(f"{k[len('share_batches_'):]}:{v:.0%}" for k, v in r.batch.items()
                          if k.startswith("share_") and v >= 0.005)
        lines.append(
            f"{r.concurrency:>4} {r.ok_rps:>9.1f} {_f(r.p50_ms):>8} {_f(r.p99_ms):>8} {r.errors:>7} "
            f"{_f(r.ok_rps / inproc.best.full_img_s if inproc else None, '.2f'):>8} {_f(f.ok_rps if f else None):>8} "
            f"{_f(r.ok_rps / f.ok_rps if f and f.ok_rps else None, '.2f'):>8} {_f(r.cpu_ms_per_ok, '.2f'):>10} "
            f"{_f(near.ort_cpu_ms_per_img if near else None, '.2f'):>10} {_f(r.batch.get('mean')):>7}  {shares}"
            + (f"  errors: {r.error_detail}" if r.errors else ""))
    if served and inproc:
        best = max(served, key=lambda r: r.ok_rps)
        c1 = next((r for r in served if r.concurrency == 1), None)
        near = _ort_cpu_near(inproc, best.batch.get("mean"))
        lines += ["", f"best served {best.ok_rps:.1f} req/s (c={best.concurrency}) = {best.ok_rps / inproc.best.full_img_s:.2f}x "
                  f"the in-process limit"]
        if c1 and c1.p50_ms is not None:
            lines.append(f"p50 at c=1 {c1.p50_ms:.1f} ms vs in-process single image {inproc.single_latency_ms:.1f} ms: "
                         f"{c1.p50_ms - inproc.single_latency_ms:+.1f} ms")
        if best.cpu_ms_per_ok is not None and near:
            lines.append(f"server CPU {best.cpu_ms_per_ok:.2f} ms per 2xx request at c={best.concurrency} vs onnxruntime "
                         f"{near.ort_cpu_ms_per_img:.2f} ms/img (batch {near.batch}): "
                         f"{best.cpu_ms_per_ok - near.ort_cpu_ms_per_img:+.2f} core-ms per request")
    if any(r.stages_ms for r in served):
        lines += ["", "service timers from /metrics (mean ms): " + ", ".join(STAGE_FAMILIES),
                  f"{'conc':>4} {'queue':>9} {'preprocess':>11} {'infer/batch':>12} {'infer/img':>10}"]
        for r in served:
            st, mb = r.stages_ms, r.batch.get("mean")
            per_img = st["inference_per_batch"] / mb if "inference_per_batch" in st and mb else None
            lines.append(f"{r.concurrency:>4} {_f(st.get('queue'), '.2f'):>9} {_f(st.get('preprocess'), '.2f'):>11} "
                         f"{_f(st.get('inference_per_batch'), '.2f'):>12} {_f(per_img, '.2f'):>10}")
    for title, series in ((FLOOR_TITLE, floor), (LIVEZ_TITLE, livez)):
        if not series:
            continue
        lines += ["", wrk_table(f"HTTP floor: {title}", series)]
        if served:
            bf = max(series, key=lambda r: r.ok_rps)
            bs = max(served, key=lambda r: r.ok_rps)
            lines.append(f"HTTP floor ({title}) best {bf.ok_rps:.1f} req/s (c={bf.concurrency}); served best / floor best "
                         f"= {bs.ok_rps / bf.ok_rps:.2f}" if bf.ok_rps else "HTTP floor: no 2xx answers")
    return "\n".join(lines)


FLOOR_TITLE = "same POST to the no-model floor service"
LIVEZ_TITLE = "GET /livez"


def plot(path: Path, label: str, served: list[WrkResult], floor: list[WrkResult], inproc: Inproc | None,
         livez: list[WrkResult] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cs = [r.concurrency for r in served]
    a1.plot(cs, [r.ok_rps for r in served], "o-", label="served (2xx req/s)")
    for series, style, title in ((floor, "s--", FLOOR_TITLE), (livez, "d:", LIVEZ_TITLE)):
        if series:
            a1.plot([r.concurrency for r in series], [r.ok_rps for r in series], style, label=f"HTTP floor ({title})")
    if inproc:
        a1.axhline(inproc.best.full_img_s, color="k", ls=":", label=f"in-process limit (batch {inproc.best.batch})")
    a1.set(xscale="log", xlabel="concurrent connections", ylabel="requests/s", title="throughput")
    a1.set_xticks(cs, [str(c) for c in cs])
    a1.legend(fontsize=8)
    a2.plot(cs, [r.p50_ms for r in served], "o-", label="p50")
    a2.plot(cs, [r.p99_ms for r in served], "^-", label="p99")
    if inproc:
        a2.axhline(inproc.single_latency_ms, color="k", ls=":", label="in-process single image")
    a2.set(xscale="log", yscale="log", xlabel="concurrent connections", ylabel="latency ms", title="latency")
    a2.set_xticks(cs, [str(c) for c in cs])
    a2.legend(fontsize=8)
    fig.suptitle(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/default"), help="bundle dir (default bundles/default)")
    ap.add_argument("--image", default="auto",
                    help="image file to send, or china / flower (scikit-learn's 640x427 JPEG photos), fashion / digit "
                         "(a 28x28 PNG); default auto: a 28 px PNG for models of input <= 64 px, else china")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "int8"), help="model file of the bundle to serve")
    ap.add_argument("--concurrency", default="1,8,32,64", help="comma list (default 1,8,32,64)")
    ap.add_argument("--duration", type=parse_duration, default=parse_duration("20s"), help="per concurrency (20s)")
    ap.add_argument("--floor-duration", type=parse_duration, default=parse_duration("10s"),
                    help="per concurrency for each HTTP floor (10s)")
    ap.add_argument("--no-floor", action="store_true", help="skip the HTTP-floor runs")
    ap.add_argument("--batches", default="1,2,4,8,16,32", help="in-process batch sizes")
    ap.add_argument("--inproc-secs", type=float, default=4.0, help="seconds per in-process point (4)")
    ap.add_argument("--no-inproc", action="store_true", help="skip the in-process measurement")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads in-process (default: cores)")
    ap.add_argument("--top-k", type=int, default=None,
                    help="top_k form field sent with each request (default: 5, or the bundle's class count if fewer; "
                         "0: leave the field out)")
    ap.add_argument("--server-cmd", default=None, help="measure this server command instead of our service")
    ap.add_argument("--url", default=None, help="with --server-cmd: the URL to POST to (127.0.0.1)")
    ap.add_argument("--field", default="image", help="multipart file field (default image)")
    ap.add_argument("--label", default=None, help="name of this run in the table and files")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the server")
    ap.add_argument("--out", type=Path, default=None, help="results dir (default loadtests/results/bench-RUN)")
    return ap


def _image_bytes(spec: str, bundle: Path) -> tuple[bytes, str]:
    """(bytes, file name) of the image to send."""
    if spec == "auto":
        try:
            size = int(json.loads((bundle / "manifest.json").read_text())["input"]["height"])
        except (OSError, ValueError, KeyError):
            size = 224
        spec = "fashion" if size <= 64 else "china"
    if spec in ("fashion", "digit"):
        from loadtests.payloads import digit_pngs, fashion_pngs
        p = (fashion_pngs(1) if spec == "fashion" else []) or digit_pngs(1)
        return p[0].data, p[0].filename
    path = sample_photo_path(spec) if spec in ("china", "flower") else spec
    if not os.path.isfile(path):
        raise SystemExit(f"image not found: {path}; give a file, or one of auto, china, flower, fashion, digit")
    return Path(path).read_bytes(), os.path.basename(path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = build_parser().parse_args(argv)
    concs = [int(c) for c in a.concurrency.split(",") if c]
    label = a.label or (f"{a.bundle.name} {a.precision}" if not a.server_cmd else "external server")
    out = a.out or HERE / "results" / ("bench-" + time.strftime("%Y%m%d-%H%M%S") + "-" + re.sub(r"\W+", "_", label))
    out.mkdir(parents=True, exist_ok=True)
    image, fname = _image_bytes(a.image, a.bundle)
    ctype = "image/jpeg" if fname.lower().endswith((".jpg", ".jpeg")) else "image/png"
    if not a.server_cmd and not (a.bundle / "manifest.json").is_file():
        raise SystemExit(f"{a.bundle} is not a bundle (no manifest.json); make one with `make serve` or python -m export")

    load_start = os.getloadavg()
    threads = a.threads
    if threads is None:
        from service.cpus import cpu_count
        threads = cpu_count()
    inproc = None
    if not a.no_inproc and not (a.server_cmd and not (a.bundle / "manifest.json").is_file()):
        inproc = measure_inproc(a.bundle, a.precision, image, [int(b) for b in a.batches.split(",")],
                                a.inproc_secs, threads)

    top_k = a.top_k
    if top_k is None:
        try:
            top_k = min(5, int(json.loads((a.bundle / "manifest.json").read_text())["num_classes"]))
        except (OSError, ValueError, KeyError):
            top_k = 5
    form = {"top_k": str(top_k)} if top_k else {}
    body, body_ctype = multipart(form, [(a.field, (fname, image, ctype))])
    (out / "body.bin").write_bytes(body)
    body_env = {"BODY_FILE": str(out / "body.bin"), "CONTENT_TYPE": body_ctype,
                "API_KEY": os.environ.get("IMGSERVE_API_KEY", "")}   # the server started here gets the same env

    if a.server_cmd:
        if not a.url or not re.match(r"^http://127\.0\.0\.1:\d+/", a.url):
            raise SystemExit("--server-cmd needs --url http://127.0.0.1:PORT/PATH")
        base, path = re.match(r"^(http://[^/]+)(/.*)$", a.url).groups()
        server = launcher.Server(shlex.split(a.server_cmd), base, out / "server.log",
                                 dict(kv.split("=", 1) for kv in a.env))
    else:
        extra = {"IMGSERVE_PRECISION": a.precision, **dict(kv.split("=", 1) for kv in a.env)}
        server = launcher.service_server([str(a.bundle)], launcher.free_port(), out / "server.log", extra)
        path = "/classify"
    served: list[WrkResult] = []
    floor: list[WrkResult] = []
    livez: list[WrkResult] = []
    with server.start():
        try:
            took = server.wait_ready() if not a.server_cmd else 0.0
            took += _wait_answering(server, path, body_env, timeout_s=300 if a.server_cmd else 30)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        log.info("server ready after %.1f s: %s processes, %.0f MiB RSS", took, len(server.pids()), launcher.rss_mib(server.pids()))
        run_wrk(server.url.rstrip("/") + path, 8, 5, body_env)   # warm-up, not counted
        served = measure_server(server, path, body_env, concs, a.duration, metrics=not a.server_cmd)
        if not a.no_floor and not a.server_cmd:
            livez = measure_server(server, "/livez", body_env, concs, a.floor_duration, method="GET", metrics=False)
        rss = launcher.rss_mib(server.pids())
    if not a.no_floor and not a.server_cmd:
        floor = measure_floor_service(out, body_env, concs, a.floor_duration, extra)
    load_end = os.getloadavg()
    table = format_table(label, served, floor, inproc, livez)
    table += (f"\nmachine load average (1 min) at start {load_start[0]:.1f}, at end {load_end[0]:.1f} on "
              f"{os.cpu_count()} cores: other work competes for the CPU when it exceeds the core count")
    print(table)
    (out / "table.txt").write_text(table + "\n")
    result = {"label": label, "bundle": str(a.bundle), "precision": a.precision, "image": fname,
              "image_bytes": len(image), "server_rss_mib_end": rss,
              "loadavg_start": load_start, "loadavg_end": load_end,
              "inproc": asdict(inproc) if inproc else None,
              "served": [dict(asdict(r), ok_rps=r.ok_rps, cpu_ms_per_req=r.cpu_ms_per_req, cpu_ms_per_ok=r.cpu_ms_per_ok)
                         for r in served],
              "floor": [dict(asdict(r), ok_rps=r.ok_rps, cpu_ms_per_req=r.cpu_ms_per_req) for r in floor],
              "livez": [dict(asdict(r), ok_rps=r.ok_rps, cpu_ms_per_req=r.cpu_ms_per_req) for r in livez]}
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(out / "bench.png", label, served, floor, inproc, livez)
    print(f"\nresults: {out} (table.txt, bench.json, bench.png, server.log)")
    return 0


FLOOR = "loadtests.floor_service:Floor"


def floor_server(port: int, log_path: Path, extra_env: dict[str, str] | None = None) -> launcher.Server:
    """The HTTP floor (loadtests/floor_service.py): the same stack as the service with no model."""
    return launcher.bentoml_serve(FLOOR, port, log_path, extra_env)


def measure_floor_service(out: Path, body_env: dict[str, str], concs: list[int], duration_s: int,
                          extra_env: dict[str, str]) -> list[WrkResult]:
    """The same POST against loadtests/floor_service.py (started and stopped here)."""
    server = floor_server(launcher.free_port(), out / "floor-server.log", extra_env)
    with server.start():
        server.wait_ready()
        _wait_answering(server, "/classify", body_env, timeout_s=30)
        run_wrk(server.url + "/classify", 8, 3, body_env)  # warm-up, not counted
        return measure_server(server, "/classify", body_env, concs, duration_s, metrics=False)


def _wait_answering(server: launcher.Server, path: str, body_env: dict[str, str], timeout_s: float = 300) -> float:
    """Wait until a POST of the benchmark's body answers 2xx (a body the server refuses is an error, said once)."""
    body = Path(body_env["BODY_FILE"]).read_bytes()
    headers = {"Content-Type": body_env["CONTENT_TYPE"]}
    if body_env.get("API_KEY"):
        headers["Authorization"] = "Bearer " + body_env["API_KEY"]
    t0, last = time.monotonic(), "no answer"
    while time.monotonic() - t0 < timeout_s:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited ({server.proc.returncode}); see {server.log_path}")
        try:
            req = urllib.request.Request(server.url + path, data=body, headers=headers)
            with urllib.request.urlopen(req, timeout=30) as r:
                if 200 <= r.status < 300:
                    log.info("first answer: %s", r.read()[:300].decode(errors="replace"))
                    return time.monotonic() - t0
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
            if 400 <= e.code < 500:
                raise RuntimeError(f"the server refuses the benchmark request: {last}") from None
        except OSError as e:
            last = str(e)
        time.sleep(1)
    raise RuntimeError(f"{server.url}{path} gave no 2xx answer in {timeout_s:.0f} s (last: {last})")


if __name__ == "__main__":
    sys.exit(main())
