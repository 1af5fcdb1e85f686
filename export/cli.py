"""``python -m export CHECKPOINT --out DIR`` / ``imgserve-export``: argument parsing only.

Exit status: 0 bundle written, 1 a gate failed (no bundle), 2 bad input (one-line error).
"""
from __future__ import annotations

import argparse
import logging
import sys

from export.onnx_export import DEFAULT_OPSET, EXPORTERS, MIN_OPSET

log = logging.getLogger("export")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by the training stage (e.g. runs/NAME/best.pt)")
    p.add_argument("--out", required=True, help="bundle directory to create (e.g. bundles/NAME)")
    p.add_argument("--name", help="bundle/model name (default: the checkpoint's folder name)")
    p.add_argument("--version", help="bundle version (default: UTC timestamp YYYYMMDD-HHMMSS)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    g = p.add_argument_group("parity gate")
    g.add_argument("--samples-count", "-n", dest="samples", type=int, default=64, help="samples for the gate (N)")
    g.add_argument("--samples", dest="samples_dir", metavar="DIR",
                   help="directory of images (class subfolders give labels) instead of the checkpoint's dataset")
    g.add_argument("--data-dir", help="where the checkpoint's dataset lives now, if it moved")
    g.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance on logits")
    g.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance on logits")
    g.add_argument("--min-top1", type=float, default=100.0, help="minimum top-1 agreement, percent")
    g.add_argument("--exporter", choices=sorted(EXPORTERS), default="dynamo",
                   help="ONNX exporter (the other one is tried if it fails)")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    g.add_argument("--seed", type=int, default=0, help="sample selection seed")
    q = p.add_argument_group("extra model files")
    q.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static QDQ quantization)")
    q.add_argument("--int8-max-drop", type=float, default=1.0, help="max top-1 accuracy drop FP32 -> INT8, points")
    q.add_argument("--calib-samples", type=int, default=256, help="training samples for INT8 calibration")
    q.add_argument("--int8-eval-samples", type=int, default=2000, help="held-out samples for the INT8 accuracy gate")
    q.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx for GPU serving")
    q.add_argument("--no-explain", dest="explain", action="store_false",
                   help="leave out the class-activation map output (docs/explain.md) even where the model has one")
    q.add_argument("--bentoml", action="store_true", help="import the bundle into the BentoML model store")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # exporter internals log every pass at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.opset < MIN_OPSET:
        print(f"error: --opset {args.opset} is below the contract's minimum {MIN_OPSET}", file=sys.stderr)
        return 2
    if not 0.0 <= args.min_top1 <= 100.0:
        print(f"error: --min-top1 must be a percentage in 0..100, got {args.min_top1}", file=sys.stderr)
        return 2
    from export.bundle import ExportError, ExportOptions, GateError, export_bundle

    opts = ExportOptions(name=args.name, version=args.version, samples=args.samples, samples_dir=args.samples_dir,
                         data_dir=args.data_dir, atol=args.atol, rtol=args.rtol, min_top1=args.min_top1 / 100.0,
                         exporter=args.exporter, opset=args.opset, int8=args.int8, explain=args.explain, int8_max_drop=args.int8_max_drop,
                         calib_samples=args.calib_samples, int8_eval_samples=args.int8_eval_samples,
                         fp16=args.fp16, bentoml=args.bentoml, force=args.force, seed=args.seed)
    try:
        out = export_bundle(args.checkpoint, args.out, opts, echo=print)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bundle written: {out}")
    return 0
