"""POST /explain: the predictions and a class-activation map (imgformat/cam.py, docs/explain.md).

A model explains when its manifest's ``explain`` section says so (export gated the heatmaps against
PyTorch) and it is served from the FP32 ONNX file that carries the ``features`` output. Its
explanations go through their own batcher over the same backend and the same inference thread as
/classify: an explanation runs the graph with the ``features`` output, a classification without.
"""
from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from pydantic import Field

import bentoml
from imgformat.bundle import explain_weights
from imgformat.cam import FEATURES_OUTPUT, class_activation_maps, heatmap_png, overlay_png
from service.batching import create_batcher
from service.errors import Refused
from service.io import ImageUpload

# What the heatmap comes back as: the map itself, a PNG over the uploaded image, or both.
OUTPUTS = ("array", "png", "both")
DEFAULT_OPACITY = 0.5


@dataclass
class Explainer:
    """Everything /explain needs for one served model."""

    weights: np.ndarray            # (num_classes, K) float32, the linear layer after the pooling
    feature_shape: tuple[int, int, int]
    batcher: Any                   # runs backend.run_with(pixels, "features")
    layer: str

    async def maps(self, pixels: np.ndarray, classes: list[Optional[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits (n, C), explained class indices (n,), heatmaps (n, H, W) in [0, 1])."""
        packed = await self.batcher.infer(pixels)
        c = self.weights.shape[0]
        logits, feats = packed[:, :c], packed[:, c:].reshape(len(packed), *self.feature_shape)
        chosen = np.array([int(np.argmax(row)) if k is None else k for row, k in zip(logits, classes)])
        return logits, chosen, class_activation_maps(feats, self.weights, chosen, pixels.shape[1], pixels.shape[2])


def attach(model: Any, settings: Any, executor: Any) -> None:
    """Give ``model`` (service.models.ServedModel) its Explainer, or the reason it has none."""
    ex = model.bundle.manifest.get("explain") or {}
    why = None
    if not ex.get("supported"):
        why = ex.get("reason") or "its bundle was exported before explanations existed: re-export it"
    elif settings.precision != "fp32":
        why = f"explanations are gated on the FP32 file only; this server runs {settings.precision} (IMGSERVE_PRECISION)"
    elif FEATURES_OUTPUT not in getattr(model.backend, "output_names", ()):
        why = f"the {model.backend.name} backend does not serve the '{FEATURES_OUTPUT}' output (use the onnx backend)"
    if why is not None:
        model.explainer, model.no_explain = None, why
        return
    weights = explain_weights(model.bundle)
    backend = model.backend
    batcher = create_batcher(settings.batcher, model=model.name, executor=executor,
                             run=lambda px: backend.run_with(px, FEATURES_OUTPUT),
                             max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms,
                             max_queue=math.ceil(settings.max_queue / settings.workers))
    batcher.per_image_s = model.batcher.per_image_s
    if hasattr(batcher, "inline"):
        batcher.inline = getattr(model.batcher, "inline", False)
    model.explainer = Explainer(weights.astype(np.float32), tuple(ex["feature_shape"]), batcher, ex["layer"])
    model.no_explain = ""


def explainer_of(model: Any) -> Explainer:
    if getattr(model, "explainer", None) is None:
        raise Refused(f"model {model.name!r} has no explanations: {getattr(model, 'no_explain', 'unknown')}",
                      400, "no_explanations")
    return model.explainer


def resolve_class(value: Any, class_names: list[str]) -> Optional[int]:
    """``class``: absent -> None (the top-1 class); an index 0..C-1 or a class label -> its index."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value in class_names:  # a label wins over an index that reads the same
        return class_names.index(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,9}", value.strip()):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(class_names):
            return value
        raise Refused(f"class {value} is outside 0..{len(class_names) - 1} for this model", 400, "bad_class")
    shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
    raise Refused(f"class {value!r} is not one of this model's classes (an index 0..{len(class_names) - 1} "
                  f"or a label: {shown})", 400, "bad_class")


def resolve_output(value: Any) -> str:
    if value is None or value == "":
        return "array"
    if value not in OUTPUTS:
        raise Refused(f"heatmap must be one of {', '.join(OUTPUTS)}, got {value!r}", 400, "bad_heatmap")
    return value


def resolve_opacity(value: Any) -> float:
    if value is None or value == "":
        return DEFAULT_OPACITY
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not 0.0 <= x <= 1.0:
        raise Refused(f"opacity must be a number in 0..1, got {value!r}", 400, "bad_opacity")
    return x


def heatmap_body(heat: np.ndarray, output: str, original: Any, box: Any, opacity: float) -> dict[str, Any]:
    """The ``heatmap`` part of the answer: rows of [0, 1] values (4 decimals) and/or a PNG overlay."""
    body: dict[str, Any] = {"height": int(heat.shape[0]), "width": int(heat.shape[1])}
    if output in ("array", "both"):
        body["values"] = np.round(heat, 4).tolist()
    if output in ("png", "both"):
        body["overlay_png"] = base64.b64encode(overlay_png(original, heat, box, opacity)).decode("ascii")
        body["heatmap_png"] = base64.b64encode(heatmap_png(heat)).decode("ascii")
        body["opacity"] = opacity
    return body


def open_original(preprocessor: Any, data: bytes) -> Any:
    """The upload decoded again at its own size, for the overlay (it already passed every check)."""
    return preprocessor.decode(preprocessor.open(io.BytesIO(data)))


class ExplainInput(bentoml.IODescriptor):
    """POST /explain form: /classify's fields plus the class to explain and the heatmap's form."""

    image: ImageUpload = Field(description="The image file (JPEG, PNG, WebP, BMP, GIF, TIFF).")
    model: Optional[str] = Field(None, description="Model name (GET /models); the default model when absent.")
    top_k: Optional[int] = Field(None, ge=1, description="How many predictions to return (default 5).")
    class_: Optional[str] = Field(None, alias="class", description="The class to explain: an index or a label "
                                  "(default: the top-1 prediction).")
    heatmap: Optional[str] = Field(None, description="array (default): the map at the model's input size, "
                                   "values in [0, 1]; png: a PNG overlay on the uploaded image (base64); both.")
    opacity: Optional[float] = Field(None, ge=0, le=1, description="Overlay opacity, 0..1 (default 0.5).")
    version: Optional[str] = Field(None, description="Model version (GET /models); absent: the traffic policy "
                                   "chooses (docs/rollouts.md).")


class ExplainOutput(bentoml.IODescriptor):
    model: str
    version: str
    predictions: list[dict]
    explained: dict
    heatmap: dict
