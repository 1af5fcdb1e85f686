"""The training loop on real data (scikit-learn digits): accuracy, outputs, checkpoints, resume, transfer hooks."""
from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from training.datasets import get_dataset_from_info
from training.train import TrainConfig, TrainError, train
from training.transforms import eval_transform

REPORTS = ("curves.png", "confusion_matrix.png", "predictions.png", "kernels.png")
# A small, fast configuration for the runs below (mlp: no conv, so kernels.png is skipped).
TINY = TrainConfig(model="mlp", dataset="digits", epochs=3, batch_size=32, lr=3e-3, limit=300, seed=1,
                   device="cpu", threads=1, progress=False)


def test_digits_run_reaches_90_percent(trained_digits_run: Path, digits_run_flags: dict):
    m = json.loads((trained_digits_run / "metrics.json").read_text())
    assert m["test_acc"] >= 0.90, f"digits test accuracy {m['test_acc']:.3f} < 0.90"
    assert [h["epoch"] for h in m["history"]] == list(range(1, digits_run_flags["epochs"] + 1))
    assert set(m["per_class_acc"]) == {str(d) for d in range(10)}
    assert sum(map(sum, m["confusion_matrix"])) == m["sizes"]["test"]
    for name in ("best.pt", "last.pt", "metrics.json", "config.json", *REPORTS):
        assert (trained_digits_run / name).stat().st_size > 0, f"{name} missing"
    cfg = json.loads((trained_digits_run / "config.json").read_text())
    assert cfg["image_size"] == 8 and cfg["channels"] == 1 and cfg["lr"] == digits_run_flags["lr"]


def test_checkpoint_contract_and_eval_pipeline(trained_digits_run: Path):
    """weights_only loading, the FORMATS.md keys, and eval_transform(preprocess) reproduces the test accuracy."""
    raw = torch.load(trained_digits_run / "best.pt", weights_only=True)
    assert raw["format"] == "imgserve.checkpoint" and raw["format_version"] == 1
    best, last = load_checkpoint(trained_digits_run / "best.pt"), load_checkpoint(trained_digits_run / "last.pt")
    for key in ("model", "num_classes", "in_channels", "input_size", "preprocess", "class_names", "dataset",
                "state_dict", "epoch", "best_val_acc", "metrics", "config", "versions"):
        assert key in best, f"best.pt lacks {key}"
    assert "optimizer_state" not in best and last["optimizer_state"] is not None
    assert best["preprocess"]["resize_policy"] == "stretch" and best["preprocess"]["color_mode"] == "L"
    assert best["model"]["kwargs"]["input_size"] == best["input_size"] == 8

    model = build_from_checkpoint(best)
    splits = get_dataset_from_info(best["dataset"])
    tf = eval_transform(best["preprocess"])
    x = torch.stack([tf(img) for img, _ in splits.test])          # (N, 1, 8, 8)
    y = torch.tensor([label for _, label in splits.test])
    with torch.inference_mode():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(best["metrics"]["test_acc"], abs=1e-6), "reloaded model disagrees with metrics.json"


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "imgserve.checkpoint", "payload": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(evil)
    assert not (tmp_path / "PWNED").exists(), "loading must not execute pickled code"


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def test_resume_continues_where_it_stopped(tmp_path):
    """2 epochs + resume to 3 gives the same history and weights as 3 epochs in one go.

    A step schedule, so the lr of an epoch does not depend on the planned number of epochs."""
    sched = replace(TINY, scheduler="step", step_size=1, gamma=0.5)
    part = train(replace(sched, epochs=2, out=str(tmp_path / "part")))
    assert load_checkpoint(part / "last.pt")["epoch"] == 2
    resumed = train(replace(sched, epochs=3, resume=str(part / "last.pt"), out=str(tmp_path / "part")))
    whole = train(replace(sched, epochs=3, out=str(tmp_path / "whole")))
    h_res = json.loads((resumed / "metrics.json").read_text())["history"]
    h_all = json.loads((whole / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in h_res] == [1, 2, 3]
    for a, b in zip(h_res, h_all):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5), f"epoch {a['epoch']} differs"
        assert a["val_acc"] == b["val_acc"]
    assert load_checkpoint(resumed / "last.pt")["epoch"] == 3
    for k, v in _state(whole / "last.pt").items():
        torch.testing.assert_close(_state(resumed / "last.pt")[k], v, rtol=1e-5, atol=1e-6, msg=f"{k} differs")
    assert not (whole / "kernels.png").exists(), "mlp has no conv layer: kernels.png is skipped"
    assert (whole / "predictions.png").exists()


def test_resume_refuses_another_model(trained_digits_run: Path):
    with pytest.raises(TrainError, match="cannot resume .*model"):
        train(replace(TINY, model="lenet", epochs=20, resume=str(trained_digits_run / "last.pt")))


def test_image_size_too_small():
    with pytest.raises(TrainError, match="--image-size 4 is too small .*use --image-size 8"):
        train(replace(TINY, image_size=4))


def test_pretrained_path_with_frozen_backbone_and_unfreeze(trained_digits_run: Path, tmp_path):
    """--pretrained PATH --freeze backbone --unfreeze-at 2:fc: the convs keep the source weights, the
    FC layer trains from epoch 2, the new head trains throughout."""
    src = _state(trained_digits_run / "best.pt")
    run = train(replace(TINY, model="simple_cnn", epochs=2, limit=100, pretrained=str(trained_digits_run / "best.pt"),
                        freeze="backbone", unfreeze_at="2:fc", out=str(tmp_path / "ft")))
    m = json.loads((run / "metrics.json").read_text())
    assert m["pretrained"]["loaded"] and "classifier.weight" in m["pretrained"]["reinitialised"]
    assert [e["epoch"] for e in m["unfreeze_events"]] == [2]
    after = _state(run / "last.pt")
    for k in ("features.0.weight", "features.3.weight"):
        torch.testing.assert_close(after[k], src[k], msg=f"frozen {k} changed")
    assert not torch.equal(after["fc.0.weight"], src["fc.0.weight"]), "fc was unfrozen at epoch 2 and must train"
    assert not torch.equal(after["classifier.weight"], src["classifier.weight"]), "the head must train"
