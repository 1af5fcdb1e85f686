"""End to end through ``training.train.train`` (the CLI's function) and the CLI itself.

A ResNet-18 (small stem, 1 channel, 8 px) is pretrained briefly on 1000 MNIST digits (the repo's
data/mnist), then fine-tuned on scikit-learn digits with each freezing policy; a torchrun run with 2
CPU processes is compared with a single-process run. Sizes are tiny on purpose: the point is the
mechanics, checked bit for bit, and one transfer claim with real accuracies: with only 50 labelled
digits, a frozen MNIST backbone plus a trained head beats the same network trained from scratch.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import build_from_checkpoint, load_checkpoint
from training.datasets import MNIST_DIR, get_dataset
from training.models import build_model
from training.train import TrainConfig, train
from training.transforms import eval_transform

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(model="resnet18", image_size=8, batch_size=16, augment=False, device="cpu", progress=False, seed=0,
            scheduler="none")
# Digits fine-tuning with few labels (50 images: 5 per class, 6 epochs of batch 16); the scratch
# comparison uses the same data, epochs and batches ("equal small budget").
DIGITS = dict(TINY, dataset="digits", limit=50, epochs=6)
HEAD_LR = 1e-2       # a linear head on frozen features takes a larger step than a whole network
SCRATCH_LR = 3e-4    # scratch's best of {3e-4, 1e-3} in the measurements (README, transfer subsection)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """best.pt of a ResNet-18 pretrained on 1000 MNIST digits (2 epochs, 8x8, grayscale)."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not in {MNIST_DIR} (the repository's data/mnist; a wheel install lacks it)")
    out = tmp_path_factory.mktemp("transfer") / "pretrain"
    run = train(TrainConfig(**dict(TINY, dataset="mnist", limit=1000, epochs=2, batch_size=32), out=str(out)))
    acc = json.loads((run / "metrics.json").read_text())["test_acc"]
    print(f"\npretrain resnet18 on mnist (1000 images, 8 px, 2 epochs): test acc {acc:.4f}")
    assert acc > 0.5, f"pretraining did not learn (test acc {acc:.3f}, chance 0.1)"
    return run / "best.pt"


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def _initial_head(num_classes: int = 10) -> dict[str, torch.Tensor]:
    """The head a run starts from: train() seeds 0, then builds the model (the head is never loaded)."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=num_classes, in_channels=1, input_size=8)
    return {k: v for k, v in model.state_dict().items() if k.startswith("fc.")}


def _acc(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["test_acc"]


@pytest.fixture(scope="module")
def frozen_run(pretrained, tmp_path_factory) -> Path:
    """Digits fine-tune of the pretrained ResNet-18 with --freeze backbone (the head at HEAD_LR)."""
    out = tmp_path_factory.mktemp("transfer") / "ft"
    return train(TrainConfig(**DIGITS, lr=HEAD_LR, pretrained=str(pretrained), freeze="backbone", out=str(out)))


def test_freeze_backbone_keeps_backbone_bit_identical(pretrained, frozen_run):
    run = frozen_run
    before, after = _state(pretrained), _state(run / "best.pt")
    backbone = [k for k in after if not k.startswith("fc.")]
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    # Parameters and BatchNorm running statistics: frozen BN layers stay in eval mode.
    assert not changed, f"frozen backbone tensors changed: {changed[:5]}"
    init = _initial_head()
    assert all(not torch.equal(init[k], after[k]) for k in init), "the head did not train"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pretrained"]["reinitialised"] == ["fc.weight", "fc.bias"], metrics["pretrained"]
    print(f"\nfine-tune --freeze backbone on digits: test acc {metrics['test_acc']:.4f}")
    assert metrics["test_acc"] > 0.3, f"frozen fine-tune barely learned: {metrics['test_acc']:.3f}"


def test_dense_head_with_dropout_on_frozen_backbone(pretrained, tmp_path):
    run = train(TrainConfig(**dict(DIGITS, limit=60, epochs=1), lr=1e-2, pretrained=str(pretrained), freeze="backbone",
                            head=[32], dropout=0.3, out=str(tmp_path / "dense")))
    before, after = _state(pretrained), _state(run / "best.pt")
    assert {k for k in after if k.startswith("fc.")} == {"fc.0.weight", "fc.0.bias", "fc.3.weight", "fc.3.bias"}
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("fc."))


def test_frozen_fine_tune_beats_scratch_at_equal_budget(frozen_run, tmp_path):
    ft = frozen_run
    scratch = train(TrainConfig(**DIGITS, lr=SCRATCH_LR, out=str(tmp_path / "scratch")))
    a_ft, a_sc = _acc(ft), _acc(scratch)
    print(f"\ndigits, 50 images, 6 epochs: fine-tuned (frozen MNIST backbone) {a_ft:.4f} vs from scratch {a_sc:.4f}")
    # Measured margins: +20, +20, +14 points at seeds 0/1/2 (README) and +8 in a clean-clone CI run,
    # where thread scheduling changes the float sums; the issue asks that fine-tuning beats scratch.
    assert a_ft > a_sc, f"fine-tuned {a_ft:.4f} does not beat scratch {a_sc:.4f} at equal budget"


def test_unfreeze_from_changes_exactly_that_param_and_after(pretrained, tmp_path):
    run = train(TrainConfig(**dict(DIGITS, limit=60, epochs=1), pretrained=str(pretrained),
                            unfreeze_from="layer4.0.conv1",
                            out=str(tmp_path / "from")))
    before, after = _state(pretrained), _state(run / "best.pt")
    names = [n for n, _ in build_model("resnet18", num_classes=10, in_channels=1, input_size=8).named_parameters()]
    start = names.index("layer4.0.conv1.weight")
    init = _initial_head()
    changed = [n for n in names if not torch.equal(init.get(n, before[n]), after[n])]
    assert changed == names[start:], f"expected {names[start]} and after to change; changed: {changed[:3]}..."
    # buffers of frozen BatchNorm layers (everything before layer4) keep the pretrained statistics
    frozen_buffers = [k for k in after if "running" in k and not k.startswith(("layer4.", "fc."))]
    assert all(torch.equal(before[k], after[k]) for k in frozen_buffers)


def test_gradual_unfreezing_is_recorded_and_applied(pretrained, tmp_path):
    run = train(TrainConfig(**dict(DIGITS, limit=60, epochs=2), pretrained=str(pretrained), freeze="backbone",
                            unfreeze_at="2:layer4", backbone_lr=1e-4, lr=1e-2, out=str(tmp_path / "gradual")))
    metrics = json.loads((run / "metrics.json").read_text())
    n_layer4 = sum(1 for n, _ in build_model("resnet18", num_classes=10, in_channels=1, input_size=8)
                   .named_parameters() if n.startswith("layer4."))
    assert metrics["unfreeze_events"] == [{"epoch": 2, "prefixes": ["layer4"], "unfrozen": n_layer4}], metrics
    before, after = _state(pretrained), _state(run / "last.pt")
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith(("layer4.", "fc.")))
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"]), "layer4 never trained"
    groups = load_checkpoint(run / "last.pt")["optimizer_state"]["param_groups"]
    assert sorted(g["lr"] for g in groups) == [1e-4, 1e-2], groups


def test_pretrained_imagenet_offline_without_cache_is_a_clear_error(tmp_path, bounded):
    """No cache, no network (an unreachable proxy: instant failure even where the internet works)."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "IMGSERVE_DOWNLOAD_TIMEOUT": "5"}
    env.update({v: "http://127.0.0.1:9" for v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")})
    env.pop("no_proxy", None), env.pop("NO_PROXY", None)
    cmd = [sys.executable, "-m", "training", "--model", "resnet18", "--dataset", "digits", "--pretrained", "imagenet",
           "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    proc = bounded(cmd, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    for needle in (str(cache), "resnet18-f37072fd.pth", "--pretrained PATH"):
        assert needle in errors[0], f"{needle!r} missing from: {errors[0]}"
    assert not (tmp_path / "run" / "best.pt").exists(), "it must not train from scratch instead"


def _evaluate(ckpt_path: Path) -> float:
    """Accuracy of a checkpoint on its dataset's test split, in this (single) process."""
    ckpt = load_checkpoint(ckpt_path)
    model = build_from_checkpoint(ckpt)
    splits = get_dataset(ckpt["dataset"]["name"], seed=0, limit=ckpt["dataset"].get("limit"))
    tf = eval_transform(ckpt["preprocess"])
    x = torch.stack([tf(splits.test[i][0]) for i in range(len(splits.test))])
    y = np.array([splits.test[i][1] for i in range(len(splits.test))])
    with torch.inference_mode():
        return float((model(x).argmax(1).numpy() == y).mean())


def test_torchrun_two_cpu_processes_matches_single_process(tmp_path, bounded):
    flags = ["--model", "simple_cnn", "--dataset", "digits", "--limit", "400", "--epochs", "4", "--batch-size", "16",
             "--optimizer", "adam", "--lr", "3e-3", "--no-augment", "--device", "cpu", "--seed", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training",
           *flags, "--out", str(tmp_path / "ddp")]
    proc = bounded(cmd, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stderr, "the run did not use 2 processes"
    ddp_ckpt = load_checkpoint(tmp_path / "ddp" / "best.pt")
    assert not any(k.startswith("module.") for k in ddp_ckpt["state_dict"]), "checkpoint must hold unwrapped weights"
    single = train(TrainConfig(model="simple_cnn", dataset="digits", limit=400, epochs=4, batch_size=16,
                               optimizer="adam", lr=3e-3, augment=False, device="cpu", seed=0, progress=False,
                               out=str(tmp_path / "single")))
    a_ddp, a_single = _acc(tmp_path / "ddp"), _acc(single)
    a_reloaded = _evaluate(tmp_path / "ddp" / "best.pt")
    print(f"\ndigits simple_cnn: torchrun 2x gloo test acc {a_ddp:.4f} (reloaded single-process {a_reloaded:.4f}), "
          f"single process {a_single:.4f}")
    assert a_reloaded == pytest.approx(a_ddp, abs=1e-9), "the DDP checkpoint evaluates differently in one process"
    assert a_ddp > 0.8 and a_single > 0.8, (a_ddp, a_single)
    assert abs(a_ddp - a_single) <= 0.08, f"DDP {a_ddp:.4f} vs single {a_single:.4f} differ too much"
