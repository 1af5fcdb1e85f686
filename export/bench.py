"""Benchmark a bundle's ONNX files on onnxruntime (CPU): images/s at several batch sizes.

    python -m export.bench bundles/NAME [--batch-sizes 1 32] [--rounds 5] [--seconds 2] [--threads 0]

Rows: each ONNX file of the bundle (FP32, INT8; FP16 only with --include-fp16) fed uint8 NHWC, and,
when the source checkpoint is readable, the same model exported with a float NCHW input, timed
(a) on pre-normalised input ("graph only") and (b) including the NumPy uint8 -> normalised float
NCHW conversion a service would then do per batch ("+ numpy prep"); and that conversion alone,
in the graph vs in NumPy ("prep only"), whose difference is too small to see in whole-model rows.
Configurations are timed in
interleaved rounds and the median round is reported, so a busy machine biases them all alike.
This prints figures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from imgformat.bundle import load_manifest

log = logging.getLogger("export.bench")


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _export_float(manifest: dict, tmp: Path) -> Path | None:
    import warnings

    import torch

    from export.bundle import ExportError, load_model
    from export.onnx_export import _quiet

    try:
        _, model = load_model(Path(manifest["source"]["checkpoint"]))
    except ExportError as e:
        log.warning("no float-input comparison: %s", e)
        return None
    pre = manifest["preprocessing"]
    example = torch.zeros(2, pre["channels"], pre["input_size"], pre["input_size"])
    path = tmp / "float_nchw.onnx"
    with _quiet(), warnings.catch_warnings():
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, input_names=["x"],
                          output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                          external_data=False)
    return path


def _prep_session(c: int, mean: np.ndarray, std: np.ndarray, threads: int):
    """Only the folded preprocessing (Transpose, Cast, Mul, Add) as an ONNX graph: isolates its cost."""
    import onnxruntime as ort
    from onnx import TensorProto as TP, helper as h, numpy_helper as nh

    nodes = [h.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2]), h.make_node("Cast", ["t"], ["f"], to=TP.FLOAT),
             h.make_node("Mul", ["f", "scale"], ["m"]), h.make_node("Add", ["m", "shift"], ["x"])]
    graph = h.make_graph(nodes, "prep", [h.make_tensor_value_info("image", TP.UINT8, ["N", None, None, c])],
                         [h.make_tensor_value_info("x", TP.FLOAT, None)],
                         [nh.from_array((1.0 / (255.0 * std)).astype(np.float32), "scale"),
                          nh.from_array((-mean / std).astype(np.float32), "shift")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _timed(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def bench(bundle: Path, batch_sizes: list[int], rounds: int, seconds: float, threads: int,
          include_fp16: bool = False, float_baseline: bool = True) -> list[dict]:
    manifest = load_manifest(bundle)
    pre = manifest["preprocessing"]
    h, c = pre["input_size"], pre["channels"]
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, c, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, c, 1, 1)
    configs: dict[tuple[str, int], Callable[[], object]] = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = [f for f, e in manifest["files"].items() if e["kind"] == "onnx" and (include_fp16 or e["precision"] != "fp16")]
        sessions = {f: _session(bundle / f, threads) for f in files}
        fsess, psess = None, _prep_session(c, mean, std, threads)
        if float_baseline:
            fpath = _export_float(manifest, Path(tmp))
            fsess = _session(fpath, threads) if fpath else None
        for b in batch_sizes:
            x = rng.integers(0, 256, size=(b, h, h, c), dtype=np.uint8)
            configs[("prep only: in graph (ORT)", b)] = lambda x=x: psess.run(["x"], {"image": x})
            configs[("prep only: numpy", b)] = lambda x=x: (
                (x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
            for f, s in sessions.items():
                configs[(f"{f} (uint8 NHWC)", b)] = lambda s=s, x=x: s.run(["logits"], {"image": x})
            if fsess is not None:
                xf = ((x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
                configs[("float NCHW, graph only", b)] = lambda x=xf: fsess.run(["logits"], {"x": x})
                configs[("float NCHW + numpy prep", b)] = lambda x=x: fsess.run(["logits"], {"x": (
                    (x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std).astype(np.float32)})
        samples: dict[tuple[str, int], list[float]] = {k: [] for k in configs}
        for _ in range(rounds):
            for key, fn in configs.items():
                samples[key].append(_timed(fn, seconds) * key[1])
    rows = []
    for (name, b), vals in samples.items():
        med = statistics.median(vals)
        rows.append({"model": name, "batch": b, "img_per_s": med, "ms_per_batch": 1000.0 * b / med,
                     "spread": (max(vals) - min(vals)) / med if med else 0.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per configuration per round")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--include-fp16", action="store_true", help="also time model.fp16.onnx on the CPU provider")
    p.add_argument("--no-float-baseline", action="store_true", help="skip the float NCHW comparison")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from imgformat.bundle import ManifestError

    try:
        rows = bench(args.bundle, args.batch_sizes, args.rounds, args.seconds, args.threads,
                     args.include_fp16, not args.no_float_baseline)
    except ManifestError as e:
        print(f"error: {e}")
        return 2
    m = load_manifest(args.bundle)
    print(f"{m['name']}:{m['version']} ({m['architecture']['name']}, {m['input']['height']}x{m['input']['width']}x"
          f"{m['input']['channels']}), onnxruntime CPU, threads={args.threads or 'all'}, "
          f"median of {args.rounds} rounds x {args.seconds:g} s")
    print(f"{'model':<34} {'batch':>5} {'img/s':>9} {'ms/batch':>9} {'spread':>7}")
    for r in sorted(rows, key=lambda r: (r["batch"], r["model"])):
        print(f"{r['model']:<34} {r['batch']:>5} {r['img_per_s']:>9.1f} {r['ms_per_batch']:>9.2f} {100 * r['spread']:>6.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
