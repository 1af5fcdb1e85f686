"""``--fp16``: a float16 ONNX file for GPU serving (same uint8 input, float32 logits).

Made by exporting the wrapper with float16 compute (``RawPixelClassifier(dtype=float16)``): the
model's weights and activations are half, the uint8 -> half cast and normalisation stay in the
graph, and the logits are cast back to float32. The file is meant for onnxruntime's CUDA provider:
its GPU parity is checked when a GPU is present; elsewhere the same gate runs on the CPU provider
(which proves the conversion, not GPU numerics) and the manifest says which one ran.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable

import torch

import imgformat.bundle as mf
from export.backends import cuda_available, ort_backend, torch_backend
from export.errors import GateError
from export.onnx_export import export_onnx
from export.parity import Tolerances, format_table, parity_gate
from export.samples import resolve_samples
from export.wrap import wrap_model

log = logging.getLogger(__name__)

FP16_TOLERANCES = Tolerances(atol=2e-2, rtol=2e-2, min_top1_agreement=0.98)


def export_fp16(ckpt: dict[str, Any], model: torch.nn.Module, tmp: Path, opts: Any,
                echo: Callable[[str], None]) -> tuple[dict, dict]:
    """Write ``model.fp16.onnx``; gate it on CUDA when present. Returns (files entries, ``fp16`` report)."""
    half = wrap_model(copy.deepcopy(model), ckpt["preprocess"], dtype=torch.float16)
    size, c = ckpt["preprocess"]["input_size"], ckpt["preprocess"]["channels"]
    example = torch.zeros(2, size, size, c, dtype=torch.uint8)
    path = tmp / "model.fp16.onnx"
    exporter, opset = export_onnx(half, example, path, opset=opts.opset, exporter=opts.exporter)
    report: dict[str, Any] = {"file": path.name,
                              "conversion": f"torch float16 export of the wrapped model ({exporter} exporter); "
                                            "uint8 input, float32 logits"}
    samples = resolve_samples(ckpt, opts.samples, split="test", samples_dir=opts.samples_dir,
                              data_dir=opts.data_dir, seed=opts.seed)
    reference = torch_backend(wrap_model(model, ckpt["preprocess"]))
    checked = cuda_available()
    provider = "CUDAExecutionProvider" if checked else "CPUExecutionProvider"
    try:
        backend = ort_backend(path, provider)
    except Exception as e:  # a CPU build without float16 kernels: nothing to compare on this host
        backend = None
        log.warning("fp16 model does not load on %s: %s", provider, str(e).splitlines()[0])
    if backend is None:
        report["parity"] = {"checked": False, "reason": f"no CUDA device and {provider} cannot run it"}
    else:
        name = "onnxruntime_cuda_fp16" if checked else "onnxruntime_cpu_fp16"
        parity = parity_gate(reference, {name: backend}, samples.images, batch_sizes=sorted({1, len(samples)}),
                             tol=FP16_TOLERANCES, sample_source=samples.source)
        echo(format_table(parity))
        if not parity["passed"]:
            raise GateError(f"fp16 parity gate failed on {provider}: no bundle written", parity)
        # the CPU run proves the conversion, not GPU numerics: "checked" stays about the GPU
        report["parity"] = {"checked": checked, **parity}
        if not checked:
            report["parity"]["reason"] = ("no CUDA device: checked on onnxruntime's CPU provider only; "
                                          "GPU parity runs when exported on a CUDA host")
    echo(f"fp16: model.fp16.onnx written; GPU parity {'checked' if checked else 'not checked (no CUDA device)'}")
    entry = mf.file_entry(path, "onnx", "fp16", opset=opset, exporter=exporter,
                          providers=["CUDAExecutionProvider"], note="GPU only; parity checked: "
                          + ("yes" if report["parity"]["checked"] else "no (exported without a GPU)"))
    return {path.name: entry}, report
