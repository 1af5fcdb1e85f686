"""Offline drift report: the drift scores the service would compute for a folder of images.

    .venv/bin/python -m monitoring.report IMAGES_DIR BUNDLE [--out DIR] [--json]

Every file under IMAGES_DIR (sorted by path) goes through what a request goes through: the bundle is
loaded as the service loads it (``service.models.load_model``: hash check, backend, preprocessor), each
file is opened and decoded by the model's preprocessor, the pixels run through the backend, and the
binning, window and scores are the service's (``service.drift``). So the printed scores are the ones
GET /models shows under ``drift`` after the same images were sent to a freshly started server. Files
that do not decode are counted by format, as ``imgserve_decode_failures_total`` counts them.

``--out DIR`` writes ``report.png`` (reference and observed shares side by side per signal) and
``report.html`` (the scores, the failures and that figure inline).
"""
from __future__ import annotations

import argparse
import base64
import collections
import html
import io
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from imgformat.bundle import BundleError
from imgformat.preprocess import ImageError, stack
from service import drift, monitoring
from service.config import ConfigError, load_settings
from service.models import ServedModel, load_model, softmax

BATCH = 32  # the service's default IMGSERVE_MAX_BATCH_SIZE
THRESHOLD_PSI = 0.25  # the usual "large shift" reading (deploy/monitoring/rules.yml alerts on it)


def load(bundle: Path, precision: str) -> ServedModel:
    settings = load_settings({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_PRECISION": precision, "IMGSERVE_THREADS": "1"})
    return load_model(settings.models[0], settings, ThreadPoolExecutor(max_workers=1))


def observe(model: ServedModel, files: list[Path]) -> tuple[drift.Binned | None, dict[str, int], list[tuple[int, int]]]:
    """Decode and classify ``files``: (their bins, decode failures by format, decoded sizes)."""
    arrays, failures, sizes = [], collections.Counter(), []
    for f in files:
        data = f.read_bytes()
        try:
            img = model.preprocessor.open(io.BytesIO(data))
            sizes.append((img.width, img.height))
            arrays.append(model.preprocessor.finish(img))
        except ImageError:
            failures[monitoring.sniff_format(data)] += 1
    if not arrays:
        return None, dict(failures), sizes
    pixels = stack(arrays)
    logits = np.concatenate([model.backend.run(pixels[i:i + BATCH]) for i in range(0, len(pixels), BATCH)])
    return drift.binned(softmax(logits), pixels), dict(failures), sizes


def report(model: ServedModel, files: list[Path], min_samples: int) -> dict[str, Any]:
    """The drift summary of ``files`` as one window (the service's ``drift`` object of /models)."""
    binned, failures, sizes = observe(model, files)
    window = drift.DriftWindow(len(model.class_names), max(1, len(files)), math.inf)
    if binned is not None:
        window.add(binned, 0.0)
    ref = model.bundle.manifest.get("reference_stats")
    out = drift.summary(ref, window.counts(0.0), min_samples)
    return {"model": model.name, "version": model.version, "files": len(files), "decode_failures": failures,
            "reference": {k: ref[v] for k, v in drift.SIGNALS.items()} if ref else None, **out,
            "median_pixels": float(np.median([w * h for w, h in sizes])) if sizes else None}


def print_table(doc: dict[str, Any]) -> None:
    print(f"model {doc['model']} v{doc['version']}: {doc['samples']} images scored, {doc['files']} files, "
          f"decode failures {doc['decode_failures'] or 'none'}")
    if doc["scores"] is None:
        print(f"no scores: {doc['reason']}")
        return
    print(f"{'signal':<12} {'psi':>8} {'js':>8}")
    for signal, s in doc["scores"].items():
        flag = "  SHIFTED (psi > %.2f)" % THRESHOLD_PSI if s["psi"] > THRESHOLD_PSI else ""
        print(f"{signal:<12} {s['psi']:>8.4f} {s['js']:>8.4f}{flag}")


def figure_png(doc: dict[str, Any], class_names: list[str]) -> bytes:
    """Reference and observed shares side by side, one panel per signal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(drift.SIGNALS), 1, figsize=(9, 3.2 * len(drift.SIGNALS)))
    for ax, signal in zip(axes, drift.SIGNALS):
        obs = np.asarray(doc["observed"][signal], dtype=float)
        ref = np.asarray(doc["reference"][signal], dtype=float)
        x = np.arange(len(obs))
        ax.bar(x - 0.2, ref / max(ref.sum(), 1), 0.4, label="reference")
        ax.bar(x + 0.2, obs / max(obs.sum(), 1), 0.4, label="observed")
        s = (doc["scores"] or {}).get(signal)
        ax.set_title(signal + (f"  (PSI {s['psi']:.3f}, JS {s['js']:.3f})" if s else ""))
        ax.set_ylabel("share")
        if signal == "class_mix":
            ax.set_xticks(x, class_names, rotation=45 if len(class_names) > 10 else 0, fontsize=8)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_report(doc: dict[str, Any], class_names: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"<tr><td>{html.escape(sig)}</td><td>{s['psi']:.4f}</td><td>{s['js']:.4f}</td></tr>"
                   for sig, s in (doc["scores"] or {}).items())
    parts = [f"<h1>Drift report: {html.escape(doc['model'])} v{html.escape(doc['version'])}</h1>",
             f"<p>{doc['samples']} images scored of {doc['files']} files; decode failures: "
             f"{html.escape(json.dumps(doc['decode_failures']))}</p>"]
    if doc["scores"] is None:
        parts.append(f"<p>No scores: {html.escape(doc['reason'])}</p>")
    else:
        parts.append(f"<table border=1><tr><th>signal</th><th>PSI</th><th>JS</th></tr>{rows}</table>"
                     f"<p>PSI &gt; {THRESHOLD_PSI} is a large shift (docs/monitoring.md).</p>")
    if doc["reference"] is not None:
        png = figure_png(doc, class_names)
        (out / "report.png").write_bytes(png)
        parts.append(f'<img alt="reference and observed distributions" '
                     f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    (out / "report.html").write_text("<!doctype html><meta charset=utf-8><title>drift report</title>"
                                     + "".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitoring.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("images", type=Path, help="folder of images (every file under it, sorted)")
    ap.add_argument("bundle", type=Path, help="bundle directory (its manifest's reference_stats is the reference)")
    ap.add_argument("--out", type=Path, help="write report.html and report.png here")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    ap.add_argument("--precision", default="fp32", help="the model file to run, as IMGSERVE_PRECISION")
    ap.add_argument("--min-samples", type=int, default=1,
                    help="no scores below this many decoded images (the service's IMGSERVE_DRIFT_MIN_SAMPLES is 200)")
    a = ap.parse_args(argv)
    if not a.images.is_dir():
        print(f"error: {a.images} is not a directory", file=sys.stderr)
        return 2
    try:
        model = load(a.bundle, a.precision)
    except (BundleError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(p for p in a.images.rglob("*") if p.is_file())
    doc = report(model, files, a.min_samples)
    if a.json:
        print(json.dumps(doc))
    else:
        print_table(doc)
    if a.out is not None:
        write_report(doc, model.class_names, a.out)
        if not a.json:
            print(f"report: {a.out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
