"""Class-activation maps at export: which architectures have them, the graph that emits the last
feature maps beside the logits, the classifier weights file, and the CAM parity gate.

A CAM is exact only for a network that ends in global average pooling and one linear layer
(dropout in between is the identity in eval mode). ``SPLITS`` maps an architecture to the function
that cuts a model there: ``(features, head)`` with ``head(features(x)) == model(x)``, the same
operations in the same order. Any other architecture (MLP, LeNet, the flatten+FC CNNs, a ResNet
with a hidden dense head) is refused with the reason in the manifest: Grad-CAM would need the
gradient of the served class at serve time, which an inference-only ONNX session does not have.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from export.errors import GateError
from export.wrap import RawPixelClassifier
from imgformat.cam import FLAT, EXPLAIN_SCHEMA_VERSION, FEATURES_OUTPUT, WEIGHTS_FILE, class_activation_maps

log = logging.getLogger(__name__)

Split = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], nn.Linear, str]


def _linear_of(head: nn.Module) -> nn.Linear | None:
    """The head's single Linear when it is one (optionally after dropout), else None."""
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear) \
            and all(isinstance(m, nn.Dropout) for m in list(head)[:-1]):
        return head[-1]
    return None


def _resnet(m: nn.Module) -> Split | None:
    fc = _linear_of(m.fc)
    if fc is None:
        return None
    def features(x):  # torchvision's ResNet.forward up to layer4 (the hand-built one has the same names)
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return features, lambda f: m.fc(torch.flatten(m.avgpool(f), 1)), fc, "layer4"


def _gap_cnn(m: nn.Module) -> Split | None:
    fc = _linear_of(m.classifier)
    if fc is None:
        return None
    return m.features, lambda f: m.classifier(torch.flatten(m.pool(f), 1)), fc, "features"


RESNETS = ("resnet18_scratch", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SPLITS: dict[str, Callable[[nn.Module], Split | None]] = {**{a: _resnet for a in RESNETS}, "gap_cnn": _gap_cnn}


def split_model(arch: str, model: nn.Module, input_chw: tuple[int, int, int] | None = None
                ) -> tuple[Split | None, str]:
    """(split, "") when ``arch`` supports CAM, else (None, why not)."""
    cut = SPLITS.get(arch)
    if cut is None:
        return None, (f"{arch} does not end in global average pooling + one linear layer, so a class-activation "
                      f"map is not defined for it (explainable: {', '.join(sorted(SPLITS))})")
    split = cut(model)
    if split is None:
        return None, f"{arch} has a hidden dense head after the pooling: CAM needs one linear layer there"
    if input_chw is not None:
        with torch.inference_mode():
            h, w = split[0](torch.zeros(1, *input_chw)).shape[2:]
        if h * w == 1:
            return None, (f"{arch} at {input_chw[1]}x{input_chw[2]} px ends in 1x1 feature maps: "
                          f"there is no position to show (train at a larger input size)")
    return split, ""


class CamClassifier(nn.Module):
    """uint8 NHWC -> (logits, features): the wrapped model with its last feature maps as an output."""

    def __init__(self, wrapped: RawPixelClassifier, split: Split):
        super().__init__()
        self.wrapped = wrapped
        self._features, self._head = split[0], split[1]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.wrapped
        x = image.permute(0, 3, 1, 2).to(w.scale.dtype)
        f = self._features(x * w.scale + w.shift)
        return self._head(f).float(), f.float()


def reference_cams(wrapped: RawPixelClassifier, split: Split, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The maps PyTorch computes from the checkpoint: Zhou et al.'s sum_k w_ck F_k, upsampled with
    torch's bilinear interpolate and min-max normalised. The independent side of the gate."""
    fc = split[2]
    with torch.inference_mode():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * wrapped.scale + wrapped.shift
        f = split[0](x).double()
        w = fc.weight.detach().double()[torch.from_numpy(classes)]
        raw = torch.einsum("nk,nkhw->nhw", w, f)
        up = torch.nn.functional.interpolate(raw[:, None], size=images.shape[1:3], mode="bilinear",
                                             align_corners=False)[:, 0]
        lo = up.amin(dim=(1, 2), keepdim=True)
        span = up.amax(dim=(1, 2), keepdim=True) - lo
        varies = span > FLAT * up.abs().amax(dim=(1, 2), keepdim=True)
        return torch.where(varies, (up - lo) / torch.where(varies, span, 1.0), 0.0).numpy()


def cam_parity(wrapped: RawPixelClassifier, split: Split, onnx_path: Path, weights: np.ndarray,
               inputs: dict[str, np.ndarray], atol: float) -> dict[str, Any]:
    """ONNX features + imgformat.cam (what the service runs) against ``reference_cams``, for the
    top-1 class and for the least likely class of every input. Raises GateError when over ``atol``."""
    from export.backends import ort_session

    sess = ort_session(onnx_path)
    results, passed = [], True
    for source, images in inputs.items():
        logits, feats = sess.run(["logits", FEATURES_OUTPUT], {"image": np.ascontiguousarray(images)})
        for which, classes in (("top1", logits.argmax(1)), ("last", logits.argmin(1))):
            got = class_activation_maps(feats, weights, classes, images.shape[1], images.shape[2])
            ref = reference_cams(wrapped, split, images, classes)
            diff = float(np.abs(got - ref).max())
            ok = bool(np.isfinite(diff) and diff <= atol)
            passed &= ok
            results.append({"inputs": source, "class": which, "images": int(len(images)),
                            "heatmap_max_abs": diff, "passed": ok})
    report = {"passed": passed, "atol": atol, "results": results}
    if not passed:
        raise GateError(f"CAM parity gate failed (ONNX heatmap vs PyTorch over {atol}): no bundle written",
                        {"explain": report})
    return report


def explain_section(split: Split | None, why_not: str, weights_entry: dict[str, Any] | None = None,
                    feature_shape: list[int] | None = None, parity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's ``explain`` section (its own schema_version, so it can grow without a new bundle format)."""
    if split is None:
        return {"schema_version": EXPLAIN_SCHEMA_VERSION, "supported": False, "reason": why_not}
    return {"schema_version": EXPLAIN_SCHEMA_VERSION, "supported": True, "method": "cam",
            "feature_output": FEATURES_OUTPUT, "layer": split[3], "feature_shape": feature_shape,
            "weights": {"file": WEIGHTS_FILE, **weights_entry}, "parity": parity}


def write_weights(split: Split, tmp: Path) -> np.ndarray:
    weights = split[2].weight.detach().float().numpy().copy()
    np.save(tmp / WEIGHTS_FILE, weights, allow_pickle=False)
    return weights


def random_inputs(like: np.ndarray, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *like.shape[1:]), dtype=np.uint8)
