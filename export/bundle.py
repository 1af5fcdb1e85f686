"""``export_bundle``: checkpoint -> bundle directory (docs/FORMATS.md), behind the parity gate.

The bundle is built in a hidden temp directory next to ``out`` and renamed into place only after
every gate passed and the manifest validated, so a failed or interrupted export never leaves a
directory that looks like a valid bundle.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from export.backends import cuda_available, ort_backend, torch_backend
from export.errors import ExportError, GateError
from export import explain
from export.onnx_export import DEFAULT_OPSET, OUTPUT_NAME, export_onnx, export_torchscript
from export.parity import Tolerances, format_table, parity_gate
from export.samples import Samples, SamplesError, resolve_samples
from export.wrap import wrap_model
import imgformat.bundle as mf
from imgformat.cam import FEATURES_OUTPUT, WEIGHTS_FILE
from imgformat import refstats
from imgformat.constants import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, NAME_RE

log = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """Everything ``python -m export`` can set (the resolved options go into the manifest)."""

    name: str | None = None
    version: str | None = None
    samples: int = 64
    samples_dir: str | None = None
    data_dir: str | None = None
    atol: float = 1e-4
    rtol: float = 1e-3
    min_top1: float = 1.0             # fraction of samples whose top-1 must agree
    exporter: str = "dynamo"
    opset: int = DEFAULT_OPSET
    int8: bool = False
    int8_max_drop: float = 1.0        # accuracy points FP32 -> INT8
    calib_samples: int = 256
    int8_eval_samples: int = 2000
    fp16: bool = False
    explain: bool = True              # the CAM output and weights, where the architecture has them
    bentoml: bool = False
    force: bool = False
    seed: int = 0


def default_name(checkpoint: Path, arch: str) -> str:
    """runs/fmnist_m3/best.pt -> "fmnist_m3" (the run's folder), else the architecture name."""
    for cand in (checkpoint.resolve().parent.name, arch):
        slug = re.sub(r"[^a-z0-9_.-]+", "-", cand.lower()).lstrip("_.-")[:64]
        if NAME_RE.match(slug):
            return slug
    return "model"


def _check_name(kind: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise ExportError(f"--{kind} {value!r} is invalid: use 1-64 of a-z 0-9 _ . - starting with a letter or digit")
    return value


def _jsonable(obj: Any) -> Any:
    """Checkpoint metadata may hold tensors or numpy scalars; the manifest holds plain JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def package_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchvision

    import training

    out = {"imgserve": training.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import onnxscript
        out["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def load_model(checkpoint: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """Load the checkpoint safely and rebuild its model; every failure is an ExportError (exit 2)."""
    from training.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
    from training.models.registry import UnknownModelError

    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        raise ExportError(f"cannot read checkpoint {checkpoint}: {e.strerror or e}") from None
    try:
        model = build_from_checkpoint(ckpt)
    except UnknownModelError as e:
        raise ExportError(f"{checkpoint}: {e}") from None
    except (RuntimeError, ValueError, TypeError, KeyError) as e:  # bad kwargs or a state_dict that does not fit
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{checkpoint}: cannot rebuild model {ckpt['model'].get('name')!r}: {first}") from None
    return ckpt, model


def prepare_out(out: Path, force: bool) -> Path:
    """Check ``out`` can receive a bundle and return a fresh temp dir beside it (same filesystem)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} already exists and is not empty: pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise ExportError(f"output directory {out.parent} is not writable ({e.strerror or e}): "
                          f"choose another --out") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a bundle is read by other users (the service)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir to ``out``; an old bundle is swapped out, then deleted."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    elif out.is_dir():
        out.rmdir()
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_parity(ckpt: dict[str, Any], wrapped: torch.nn.Module, tmp: Path, opts: ExportOptions,
               echo: Callable[[str], None], model: torch.nn.Module | None = None
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Samples]:
    """Write model.onnx and model.ts into ``tmp`` and run the gates (logits, and the CAM heatmaps
    when the architecture has them). Returns (files entries, parity report, explain section, samples)."""
    try:
        samples = resolve_samples(ckpt, opts.samples, split="test", samples_dir=opts.samples_dir,
                                  data_dir=opts.data_dir, seed=opts.seed)
    except SamplesError as e:
        raise ExportError(str(e)) from None
    # batch 2 as the tracing example: batch 1 could be specialised into the graph
    example = torch.from_numpy(np.ascontiguousarray(samples.images[:1].repeat(2, axis=0)))
    onnx_path, ts_path = tmp / "model.onnx", tmp / "model.ts"
    split, why_not = explain.split_model(ckpt["model"]["name"], model if model is not None else wrapped.model,
                                         wrapped_input_chw(samples.images))
    if not opts.explain:
        split, why_not = None, "exported with --no-explain"
    graph = explain.CamClassifier(wrapped, split).eval() if split is not None else wrapped
    outputs = (OUTPUT_NAME, FEATURES_OUTPUT) if split is not None else (OUTPUT_NAME,)
    exporter, opset = export_onnx(graph, example, onnx_path, opset=opts.opset, exporter=opts.exporter,
                                  outputs=outputs)
    reloaded = export_torchscript(wrapped, example, ts_path)

    backends = {"torchscript": torch_backend(reloaded), "onnxruntime_cpu": ort_backend(onnx_path)}
    skipped = []
    if cuda_available():
        try:
            backends["onnxruntime_cuda"] = ort_backend(onnx_path, "CUDAExecutionProvider")
        except Exception as e:  # a GPU whose CUDA/cuDNN libraries onnxruntime cannot load
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("onnxruntime's CUDA provider does not start here (%s): CUDA parity skipped", first)
            skipped.append(f"onnxruntime_cuda: provider failed to start: {first[:200]}")
    else:
        skipped.append("onnxruntime_cuda: no CUDA device (CUDAExecutionProvider needs a GPU)")
    tol = Tolerances(opts.atol, opts.rtol, opts.min_top1)
    report = parity_gate(torch_backend(wrapped), backends, samples.images,
                         batch_sizes=sorted({1, len(samples)}), tol=tol, sample_source=samples.source,
                         skipped=skipped)
    echo(format_table(report))
    if not report["passed"]:
        raise GateError("parity gate failed: no bundle written", report)
    files = {
        "model.onnx": mf.file_entry(onnx_path, "onnx", "fp32", opset=opset, exporter=exporter),
        "model.ts": mf.file_entry(ts_path, "torchscript", "fp32", exporter="torch.jit.trace"),
    }
    explained = explain_gate(wrapped, split, why_not, onnx_path, samples.images, tmp, opts, echo)
    return files, report, explained, samples


def explain_gate(wrapped: torch.nn.Module, split: Any, why_not: str, onnx_path: Path, images: np.ndarray,
                 tmp: Path, opts: ExportOptions, echo: Callable[[str], None]) -> dict[str, Any]:
    """The manifest's ``explain`` section: CAM weights written and their heatmaps gated, or why not."""
    if split is None:
        echo(f"explanations: none ({why_not})")
        return explain.explain_section(None, why_not)
    weights = explain.write_weights(split, tmp)
    inputs = {"real": images, "random": explain.random_inputs(images, min(len(images), 16), opts.seed)}
    cam = explain.cam_parity(wrapped, split, onnx_path, weights, inputs, opts.atol)
    worst = max(r["heatmap_max_abs"] for r in cam["results"])
    echo(f"explanations: CAM from {split[3]}, heatmap parity ONNX vs PyTorch max |diff| {worst:.2e} "
         f"(atol {opts.atol}) on real and random inputs: passed")
    with torch.inference_mode():
        shape = list(split[0](torch.zeros(1, *wrapped_input_chw(images))).shape[1:])
    entry = mf.file_entry(tmp / WEIGHTS_FILE, "weights", "fp32")
    return explain.explain_section(split, "", {k: entry[k] for k in ("sha256", "bytes")}, shape, cam)


def wrapped_input_chw(images: np.ndarray) -> tuple[int, int, int]:
    """(N, H, W, C) samples -> the model's (C, H, W)."""
    return images.shape[3], images.shape[1], images.shape[2]


def reference_stats(wrapped: torch.nn.Module, samples: Samples) -> dict[str, Any]:
    """The manifest's ``reference_stats``: the exported model on the held-out samples (already through
    the one preprocessing path), so the service compares live traffic with what validation looked like."""
    with torch.no_grad():
        probs = torch.softmax(wrapped(torch.from_numpy(np.ascontiguousarray(samples.images))).float(), dim=1)
    return refstats.compute(probs.numpy(), samples.images, samples.labels, samples.source)


def build_manifest(ckpt: dict[str, Any], checkpoint: Path, name: str, version: str, files: dict[str, Any],
                   parity: dict[str, Any], extra: dict[str, Any], created: _dt.datetime) -> dict[str, Any]:
    pre = ckpt["preprocess"]
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
        "name": name, "version": version,
        "architecture": _jsonable(ckpt["model"]),
        "class_names": [str(c) for c in ckpt["class_names"]], "num_classes": int(ckpt["num_classes"]),
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "height": int(pre["input_size"]),
                  "width": int(pre["input_size"]), "channels": int(pre["channels"])},
        "output": {"name": "logits", "dtype": "float32", "kind": "logits"},
        "preprocessing": {**_jsonable(pre), "normalization_in_graph": True},
        "files": files,
        "parity": _jsonable(parity),
        "metrics": _jsonable(ckpt.get("metrics") or {}),
        "dataset": _jsonable(ckpt.get("dataset") or {}),
        "source": {"checkpoint": str(checkpoint), "checkpoint_sha256": mf.sha256_file(checkpoint),
                   "epoch": ckpt.get("epoch"), "best_val_acc": ckpt.get("best_val_acc")},
        "versions": package_versions(),
        "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        **_jsonable(extra),
    }
    return mf.validate_manifest(manifest)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def export_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike, options: ExportOptions | None = None,
                  *, echo: Callable[[str], None] | None = None, **kwargs: Any) -> Path:
    """Export ``checkpoint`` to the bundle directory ``out`` and return its path.

    ``options`` or keyword arguments (the ExportOptions fields) set everything else. Raises
    ExportError for bad input and GateError when a gate fails; ``out`` is then left untouched.
    ``echo`` receives the human-readable tables (the CLI passes ``print``).
    """
    opts = options or ExportOptions(**kwargs)
    echo = echo or (lambda s: log.info("%s", s))
    checkpoint, out = Path(checkpoint), Path(out)
    if opts.samples < 1:
        raise ExportError(f"--samples-count must be >= 1, got {opts.samples}")
    ckpt, model = load_model(checkpoint)
    name = _check_name("name", opts.name or default_name(checkpoint, ckpt["model"]["name"]))
    created = _dt.datetime.now(_dt.timezone.utc)
    version = _check_name("version", opts.version or created.strftime("%Y%m%d-%H%M%S"))
    tmp = prepare_out(out, opts.force)
    try:
        torch.manual_seed(opts.seed)
        wrapped = wrap_model(model, ckpt["preprocess"])
        files, parity, explain_info, samples = run_parity(ckpt, wrapped, tmp, opts, echo, model)
        extra: dict[str, Any] = {"explain": explain_info, "reference_stats": reference_stats(wrapped, samples)}
        if opts.int8:
            from export.quantize import quantize_bundle

            files_i8, extra["int8"] = quantize_bundle(ckpt, tmp, opts, echo)
            files.update(files_i8)
        if opts.fp16:
            from export.fp16 import export_fp16

            files_f16, extra["fp16"] = export_fp16(ckpt, model, tmp, opts, echo)
            files.update(files_f16)
        manifest = build_manifest(ckpt, checkpoint, name, version, files, parity, extra, created)
        (tmp / mf.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        mf.verify_files(tmp, mf.load_manifest(tmp))  # what the service will do, before publishing
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundle written to %s", out)
    if opts.bentoml:
        from imgformat.store import StoreError, import_to_bentoml

        try:
            tag = import_to_bentoml(out, replace=opts.force)
        except StoreError as e:
            raise ExportError(str(e)) from None
        echo(f"BentoML model store: {tag}")
    return out
