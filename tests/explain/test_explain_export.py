"""Export side of explanations: which architectures have CAM and where they are cut, the ONNX graph's
second output, the CAM parity gate (ONNX + imgformat.cam against PyTorch, real and random inputs),
the manifest's ``explain`` section and the hash-checked weights file."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export import explain
from export.onnx_export import export_onnx
from export.wrap import wrap_model
from imgformat.bundle import BundleError, explain_weights, load_bundle
from training.models.registry import build_model

PRE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def cam_onnx(arch: str, classes: int, size: int, n: int, tmp_path):
    """A randomly initialised ``arch`` exported with its features output, and ``n`` random images."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=classes, in_channels=3, input_size=size).eval()
    wrapped = wrap_model(model, PRE)
    split, _ = explain.split_model(arch, model, (3, size, size))
    images = np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    path = tmp_path / "m.onnx"
    export_onnx(explain.CamClassifier(wrapped, split).eval(), torch.from_numpy(images[:2]), path,
                outputs=("logits", "features"))
    return wrapped, split, images, path


@pytest.mark.parametrize("arch", [*explain.RESNETS, "gap_cnn"])
def test_every_resnet_and_gap_cnn_splits_into_features_and_head_exactly(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=3, input_size=64).eval()
    split, why = explain.split_model(arch, model, (3, 64, 64))
    assert split is not None, why
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats = split[0](x)
        assert torch.equal(split[1](feats), model(x))  # the same operations: not close, equal
    assert feats.dim() == 4 and feats.shape[2] * feats.shape[3] > 1
    assert split[2].weight.shape == (7, feats.shape[1])


@pytest.mark.parametrize("arch, kwargs, needle", [
    ("simple_cnn", {}, "global average pooling"), ("mlp", {}, "global average pooling"),
    ("lenet", {}, "global average pooling"), ("cifar_cnn_m3", {}, "global average pooling"),
    ("resnet18", {"head": (32,)}, "hidden dense head")])
def test_architectures_without_a_gap_linear_head_are_refused_with_the_reason(arch, kwargs, needle):
    model = build_model(arch, num_classes=4, in_channels=3, input_size=32, **kwargs).eval()
    split, why = explain.split_model(arch, model, (3, 32, 32))
    assert split is None and needle in why


def test_one_by_one_feature_maps_are_refused():
    model = build_model("resnet18", num_classes=4, in_channels=1, input_size=8).eval()
    split, why = explain.split_model("resnet18", model, (1, 8, 8))
    assert split is None and "1x1 feature maps" in why


def test_resnet18_onnx_heatmaps_match_pytorch(tmp_path):
    """The CAM gate on a torchvision ResNet-18 (random weights, 64 px: 4x4 maps) end to end."""
    wrapped, split, images, path = cam_onnx("resnet18", 5, 64, 6, tmp_path)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits", "features"]
    weights = explain.write_weights(split, tmp_path)
    report = explain.cam_parity(wrapped, split, path, weights, {"random": images}, atol=1e-4)
    assert report["passed"] and max(r["heatmap_max_abs"] for r in report["results"]) <= 1e-4


def test_cam_gate_refuses_a_graph_whose_maps_disagree(tmp_path):
    from export.errors import GateError

    wrapped, split, images, path = cam_onnx("gap_cnn", 3, 16, 4, tmp_path)
    wrong = explain.write_weights(split, tmp_path)[::-1].copy()  # another class's row for each class
    with pytest.raises(GateError, match="CAM parity gate failed"):
        explain.cam_parity(wrapped, split, path, wrong, {"random": images}, atol=1e-4)


def test_bundle_manifest_says_which_models_explain(gap_digits_bundle, digits_bundle):
    gap = load_bundle(gap_digits_bundle)
    ex = gap.manifest["explain"]
    assert ex["supported"] and ex["method"] == "cam" and ex["schema_version"] == 1
    assert {r["inputs"] for r in ex["parity"]["results"]} == {"real", "random"}
    assert all(r["heatmap_max_abs"] <= 1e-4 for r in ex["parity"]["results"])
    assert explain_weights(gap).shape == (10, ex["feature_shape"][0])
    plain = load_bundle(digits_bundle).manifest["explain"]
    assert plain["supported"] is False and "simple_cnn" in plain["reason"]
    assert explain_weights(load_bundle(digits_bundle)) is None


def test_a_changed_weights_file_is_refused(gap_digits_bundle, tmp_path):
    import shutil

    copy = tmp_path / "gap"
    shutil.copytree(gap_digits_bundle, copy)
    w = np.load(copy / "cam_weights.npy")
    np.save(copy / "cam_weights.npy", w * 2)
    with pytest.raises(BundleError, match="sha256"):
        explain_weights(load_bundle(copy))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["explain"]["supported"] = True
    del manifest["explain"]["weights"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="explain"):
        load_bundle(copy)


def test_no_explain_leaves_the_output_and_weights_out(gap_digits_run, tmp_path):
    from export import export_bundle

    out = export_bundle(gap_digits_run / "best.pt", tmp_path / "plain", name="plain", version="1", samples=8,
                        explain=False)
    manifest = load_bundle(out).manifest
    assert manifest["explain"] == {"schema_version": 1, "supported": False, "reason": "exported with --no-explain"}
    assert [o.name for o in onnx.load(str(out / "model.onnx")).graph.output] == ["logits"]
    assert not (out / "cam_weights.npy").exists()
