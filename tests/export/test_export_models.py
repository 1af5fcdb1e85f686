"""Every registered model exports and passes the parity gate (random init, small inputs).

Real samples: the checkpoints name the digits dataset, so the gate feeds real digits through the
checkpoint's own colour conversion and resize (16 px gray, or 32 px RGB for the ResNets).
BatchNorm statistics are estimated on a few batches first: a random-init ResNet-152 otherwise
produces logits around 1e5, which says nothing about export precision.
"""
from __future__ import annotations

import pytest
import torch

from export import export_bundle
from imgformat.bundle import load_manifest, verify_files
from training.checkpoint import save_checkpoint
from training.models import build_model, list_models
from imgformat.spec import make_preprocess

# ResNets at 32 px RGB with their ImageNet stem (small_stem=False): 1 px at layer4 keeps them fast
BIG = {name for name in list_models() if name.startswith("resnet")}
SLOW = {"resnet34", "resnet50", "resnet101", "resnet152"}


def _calibrate_bn(model: torch.nn.Module, channels: int, size: int) -> None:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, channels, size, size))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def make_checkpoint(path, arch: str):
    channels, size = (3, 32) if arch in BIG else (1, 16)
    kwargs = {"num_classes": 10, "in_channels": channels, "input_size": size, "head": [], "dropout": 0.0}
    if arch in BIG:
        kwargs["small_stem"] = False
    torch.manual_seed(0)
    model = build_model(arch, **kwargs)
    _calibrate_bn(model, channels, size)
    pre = make_preprocess(channels=channels, input_size=size, mean=[0.3] * channels, std=[0.37] * channels)
    return save_checkpoint(path, {
        "model": {"name": arch, "kwargs": kwargs}, "num_classes": 10, "in_channels": channels, "input_size": size,
        "preprocess": pre, "class_names": [str(i) for i in range(10)], "dataset": {"name": "digits", "seed": 0},
        "state_dict": model.state_dict(), "epoch": 0, "best_val_acc": 0.0, "metrics": {}, "config": {},
    })


# the deep ResNets take 20-60 s each on 2 cores (mostly first-call overheads of 100+ layers), hence "slow"
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in list_models()])
def test_every_model_exports_and_passes_gate(arch, tmp_path):
    ckpt = make_checkpoint(tmp_path / arch / "best.pt", arch)
    out = export_bundle(ckpt, tmp_path / "bundle", samples=4)
    m = load_manifest(out)
    verify_files(out, m)
    assert m["parity"]["passed"], m["parity"]
    assert m["architecture"]["name"] == arch
    assert m["parity"]["sample_source"] == "dataset digits (test split)", m["parity"]["sample_source"]
    for r in m["parity"]["results"]:
        assert r["logits_max_abs"] <= 1e-4 + 1e-3 * 50, f"{arch} {r}"
