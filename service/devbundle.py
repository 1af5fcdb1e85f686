"""Write a bundle from a checkpoint when export/ is not available (tests and quickbench only).

Prefers ``export.export_bundle`` (the real exporter, with its parity gate); falls back to a minimal
writer that follows docs/FORMATS.md: the eager model wrapped to take uint8 NHWC pixels, exported
with torch.onnx (dynamic batch) and TorchScript, plus a manifest with sha256 hashes.
Imports torch: never used while serving.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def make_bundle(checkpoint: str | Path, out: str | Path, *, name: str | None = None, int8: bool = False) -> Path:
    """checkpoint -> bundle directory ``out``; returns ``out``."""
    try:
        from export import export_bundle  # type: ignore[attr-defined]
    except ImportError:
        export_bundle = None
    if export_bundle is not None:
        kw: dict[str, Any] = {"int8": int8} if int8 else {}
        if name:
            kw["name"] = name
        try:
            export_bundle(checkpoint, out, **kw)
            return Path(out)
        except TypeError:  # an older/newer signature: fall back rather than guess
            logger.warning("export.export_bundle signature differs; using the minimal writer")
    return _minimal_bundle(checkpoint, out, name=name)


def _minimal_bundle(checkpoint: str | Path, out: str | Path, *, name: str | None) -> Path:
    import torch

    from training.checkpoint import build_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = build_from_checkpoint(ckpt)
    pre = ckpt["preprocess"]

    class RawPixels(torch.nn.Module):
        """uint8 (B, H, W, C) -> logits: scaling, mean/std and NHWC -> NCHW inside the graph."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            c = len(pre["mean"])
            self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(pre["std"]))).view(1, c, 1, 1))
            self.register_buffer("shift", (torch.tensor(pre["mean"]) / torch.tensor(pre["std"])).view(1, c, 1, 1))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.permute(0, 3, 1, 2).float()  # (B, C, H, W)
            return self.inner(x * self.scale - self.shift)

    wrapped = RawPixels(model).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = pre["input_size"]
    dummy = torch.zeros(2, s, s, pre["channels"], dtype=torch.uint8)
    torch.onnx.export(wrapped, (dummy,), out / "model.onnx", input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False)
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(wrapped, dummy), str(out / "model.ts"))
    files = {}
    for fname, kind in (("model.onnx", "onnx"), ("model.ts", "torchscript")):
        data = (out / fname).read_bytes()
        files[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "kind": kind, "precision": "fp32"}
    manifest = {
        "format": "imgserve.bundle", "format_version": 1,
        "name": name or ckpt["model"]["name"].replace("_", "-"), "version": "dev",
        "architecture": ckpt["model"], "class_names": list(ckpt["class_names"]), "num_classes": ckpt["num_classes"],
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "height": s, "width": s, "channels": pre["channels"]},
        "output": {"name": "logits", "dtype": "float32", "kind": "logits"},
        "preprocessing": {**pre, "normalization_in_graph": True},
        "files": files, "parity": {}, "metrics": ckpt.get("metrics", {}),
        "source": {"checkpoint": str(checkpoint)}, "versions": {"torch": torch.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
