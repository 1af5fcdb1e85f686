"""ONNX and TorchScript export of a wrapped model, with the structural checks of the contract.

Two ONNX exporters, chosen by name (``--exporter``): ``dynamo`` (torch.export + onnxscript, the
default in torch 2.14) and ``torchscript`` (the legacy tracer). If the chosen one fails on a model
the other is tried, and the manifest records which one wrote the file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable

import onnx
import torch

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
DEFAULT_OPSET = 18
MIN_OPSET = 17


class OnnxExportError(RuntimeError):
    """The exporter failed or wrote a file that breaks the bundle contract."""


@contextlib.contextmanager
def _quiet():
    """Both exporters print progress and deprecation chatter; keep the CLI output to our table."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_dynamo(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                   outputs: tuple[str, ...]) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet():
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(outputs),
                          dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=False, verbose=False)


def _export_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                        outputs: tuple[str, ...]) -> None:
    with _quiet():
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(outputs),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                          do_constant_folding=True)


EXPORTERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Path, int, tuple[str, ...]], None]] = {
    "dynamo": _export_dynamo,
    "torchscript": _export_torchscript,
}


def check_onnx(path: Path, *, input_dtype: int = onnx.TensorProto.UINT8,
               output_dtype: int = onnx.TensorProto.FLOAT, outputs: tuple[str, ...] = (OUTPUT_NAME,)) -> onnx.ModelProto:
    """Contract checks: full checker, opset >= 17, one self-contained file, named I/O, dynamic batch.

    ``outputs``: ``logits`` first; an explainable model adds ``features`` (docs/explain.md)."""
    model = onnx.load(str(path), load_external_data=False)
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        raise OnnxExportError(f"{path.name} stores weights outside the file; the bundle keeps one file per model")
    onnx.checker.check_model(model, full_check=True)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise OnnxExportError(f"{path.name} has opset {opset}, the contract needs >= {MIN_OPSET}")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != list(outputs):
        raise OnnxExportError(f"{path.name} has inputs {[i.name for i in inputs]} / outputs "
                              f"{[o.name for o in model.graph.output]}, expected [{INPUT_NAME}] / {list(outputs)}")
    itype, otype = inputs[0].type.tensor_type, model.graph.output[0].type.tensor_type
    if itype.elem_type != input_dtype or otype.elem_type != output_dtype:
        raise OnnxExportError(f"{path.name} has input/output element types {itype.elem_type}/{otype.elem_type}")
    if itype.shape.dim[0].dim_value:  # a fixed number here means the batch axis is not dynamic
        raise OnnxExportError(f"{path.name} has a fixed batch size {itype.shape.dim[0].dim_value}")
    return model


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, *,
                opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                outputs: tuple[str, ...] = (OUTPUT_NAME,)) -> tuple[str, int]:
    """Export ``module`` to ``path`` and check it; returns (exporter used, opset)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    order = [exporter] + [e for e in EXPORTERS if e != exporter]
    errors = []
    for name in order:
        try:
            EXPORTERS[name](module, example, path, opset, outputs)
            check_onnx(path, outputs=outputs)
            return name, opset
        except Exception as e:  # exporter internals raise anything; try the other, report both
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("ONNX exporter %r failed: %s", name, first[:300])
            errors.append(f"{name}: {first[:300]}")
            path.unlink(missing_ok=True)
    raise OnnxExportError("ONNX export failed with every exporter: " + " | ".join(errors))


def export_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.jit.ScriptModule:
    """Trace, save, and return the module *reloaded from disk* (that is what the gate checks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in 2.14 but still the TorchScript format
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path))
        return torch.jit.load(str(path), map_location="cpu").eval()
