"""``--int8``: onnxruntime static quantization (QDQ, per-channel) with its own accuracy gate.

Calibration uses real *training* samples; the gate compares FP32 and INT8 top-1 accuracy on the
held-out test split. The uint8 -> float preprocessing nodes at the graph's input (Cast, Transpose,
Mul, Add) stay in float: quantizing the normalised input twice would only lose precision.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

import imgformat.bundle as mf
from export.backends import ort_session
from export.errors import ExportError, GateError
from export.parity import run_batched
from export.samples import SamplesError, resolve_samples

log = logging.getLogger(__name__)

COMPUTE_OPS = {"Conv", "Gemm", "MatMul"}
CALIB_BATCH = 32
EVAL_BATCH = 64


class ImageReader:
    """onnxruntime CalibrationDataReader over a uint8 (N, H, W, C) array, in batches."""

    def __init__(self, images: np.ndarray, batch: int = CALIB_BATCH):
        self.images, self.batch = images, batch
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.images), self.batch):
            yield {"image": np.ascontiguousarray(self.images[i:i + self.batch])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def input_preprocessing_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the ``image`` input and the first Conv/Gemm/MatMul."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen: list[str] = []
    frontier = [i.name for i in model.graph.input]
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type in COMPUTE_OPS or node.name in seen:
                continue
            seen.append(node.name)
            frontier.extend(node.output)
    return seen


def quantize_int8(fp32_path: Path, int8_path: Path, calib: np.ndarray) -> dict[str, Any]:
    """Pre-process, calibrate and quantize ``fp32_path`` into ``int8_path``; returns the settings used."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=int8_path.parent) as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        exclude = input_preprocessing_nodes(onnx.load(str(pre)))
        settings = {"format": "QDQ", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                    "calibrate_method": "MinMax", "reduce_range": False, "nodes_kept_float": exclude,
                    "preprocess": "onnxruntime.quantization.shape_inference.quant_pre_process"}
        # U8 activations x S8 weights: the combination x86 VNNI kernels are built for
        quantize_static(str(pre), str(int8_path), ImageReader(calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"])
    onnx.checker.check_model(onnx.load(str(int8_path)), full_check=True)
    return settings


def top1(path: Path, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of an ONNX file on labelled uint8 images, and its predictions."""
    sess = ort_session(path)
    pred = run_batched(lambda x: sess.run(["logits"], {"image": x})[0], images, EVAL_BATCH).argmax(1)
    return float(np.mean(pred == labels)), pred


def quantize_bundle(ckpt: dict[str, Any], tmp: Path, opts: Any, echo: Callable[[str], None]) -> tuple[dict, dict]:
    """Write ``model.int8.onnx`` next to ``model.onnx`` and run the accuracy gate.

    Returns (files entries, the manifest's ``int8`` report); raises GateError when INT8 loses more
    than ``opts.int8_max_drop`` points of top-1 accuracy.
    """
    try:
        calib = resolve_samples(ckpt, opts.calib_samples, split="train", samples_dir=opts.samples_dir,
                                data_dir=opts.data_dir, part="calib", allow_random=False, seed=opts.seed)
        held = resolve_samples(ckpt, opts.int8_eval_samples, split="test", samples_dir=opts.samples_dir,
                               data_dir=opts.data_dir, part="eval", allow_random=False, seed=opts.seed)
    except SamplesError as e:
        raise ExportError(f"--int8 {e}") from None
    if held.labels is None:
        raise ExportError("--int8 needs labelled held-out samples: give --samples DIR one subfolder per class name")
    fp32_path, int8_path = tmp / "model.onnx", tmp / "model.int8.onnx"
    settings = quantize_int8(fp32_path, int8_path, calib.images)
    acc32, p32 = top1(fp32_path, held.images, held.labels)
    acc8, p8 = top1(int8_path, held.images, held.labels)
    drop = 100.0 * (acc32 - acc8)
    passed = drop <= opts.int8_max_drop
    report = {"file": int8_path.name, "calibration_samples": int(len(calib)), "calibration_source": calib.source,
              "eval_samples": int(len(held)), "eval_source": held.source, "fp32_top1": acc32, "int8_top1": acc8,
              "top1_agreement_with_fp32": float(np.mean(p32 == p8)), "max_drop": float(opts.int8_max_drop),
              "passed": passed, "settings": settings}
    echo(f"int8 accuracy on {len(held)} held-out samples ({held.source}): FP32 {100 * acc32:.2f} %  "
         f"INT8 {100 * acc8:.2f} %  drop {drop:+.2f} points (max {opts.int8_max_drop:g})  "
         f"agreement {100 * report['top1_agreement_with_fp32']:.2f} %  -> {'ok' if passed else 'FAIL'}")
    if not passed:
        raise GateError(f"int8 accuracy gate failed: top-1 dropped {drop:.2f} points (> {opts.int8_max_drop:g}); "
                        f"no bundle written (raise --int8-max-drop or export without --int8)", report)
    return {int8_path.name: mf.file_entry(int8_path, "onnx", "int8")}, report
