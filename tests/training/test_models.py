"""Every registered model builds and maps (B, C, H, W) to (B, num_classes); ResNet-18 matches torchvision."""
from __future__ import annotations

import pytest
import torch
import torchvision

from training.models import build_model, get_model_spec, list_models
from training.models.registry import UnknownModelError

# 224 px is cheap only for the small models; the ResNets get their "large" check at 96 px
# (above the 64 px small-stem limit, so the ImageNet stem is exercised).
CHEAP = {"mlp", "lenet", "simple_cnn"} | {m for m in list_models() if m.startswith("cifar_cnn")}
NUM_CLASSES = 7
# The deep ResNets take seconds just to initialise on a busy CPU: they get two builds that still
# cover both channel counts and both size regimes; every other model gets the full grid.
DEEP = {"resnet50", "resnet101", "resnet152"}
GRID = [(name, ch, kind) for name in list_models() for ch in (1, 3) for kind in ("small", "large")
        if name not in DEEP or (ch, kind) in ((1, "small"), (3, "large"))]


def _large(name: str) -> int:
    return 224 if name in CHEAP else 96


@pytest.mark.parametrize("name,channels,size_kind", GRID)
def test_model_output_shape(name, channels, size_kind):
    size = max(8, get_model_spec(name).min_input_size) if size_kind == "small" else _large(name)
    model = build_model(name, num_classes=NUM_CLASSES, in_channels=channels, input_size=size).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, NUM_CLASSES), f"{name} at {channels}x{size}x{size} gave {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{name} produced non-finite logits"


@pytest.mark.parametrize("name", ["lenet", "cifar_cnn_m3", "resnet18"])
def test_dense_head_with_dropout(name):
    """seeds/002: --head 512,256 --dropout 0.5 puts Linear-ReLU-Dropout blocks before the classes."""
    model = build_model(name, num_classes=5, in_channels=1, input_size=28, head=[64, 32], dropout=0.5).eval()
    head = dict(model.named_modules())[get_model_spec(name).classifier]
    assert any(isinstance(m, torch.nn.Dropout) for m in head.modules()), "head has no dropout"
    widths = [m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [64, 32, 5], f"head widths {widths}"
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet18_scratch"])
def test_resnet18_matches_torchvision(name):
    """Same parameter count, state_dict keys/shapes and outputs as torchvision's resnet18 (ImageNet stem, 96 px)."""
    ref = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    ours = build_model(name, num_classes=10, in_channels=3, input_size=96).eval()
    assert _params(ours) == _params(ref), f"{name}: {_params(ours)} parameters vs torchvision {_params(ref)}"
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes, "state_dict keys or shapes differ from torchvision's resnet18"
    ours.load_state_dict(ref.state_dict())  # the structure is interchangeable: same function, same output
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        got, want = ours(x), ref(x)
    assert got.shape == want.shape == (2, 10)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_resnet_small_stem_for_small_inputs():
    """Inputs <= 64 px get the 3x3 stride-1 stem without max-pool (seeds/000 at 28x28)."""
    small = build_model("resnet18_scratch", num_classes=10, in_channels=1, input_size=28)
    big = build_model("resnet18_scratch", num_classes=10, in_channels=1, input_size=96)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, torch.nn.MaxPool2d)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError, match="valid models: .*cifar_cnn_m3.*resnet18"):
        build_model("resnet9000", num_classes=10)
