"""The command line: one-line errors with exit status 2, --resume filling flags from the checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits", "--model", "mlp", "--limit", "60", "--batch-size", "32", "--threads", "1",
        "--no-progress"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), f"expected one error line, got {err}"
    return err[0]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnet9000"], "valid models: "),
    (["--dataset", "imagenet-21k"], "valid datasets: "),
    (["--dataset", "fashion-mnist", "--data-dir", "{tmp}/none"], "apt-get install dataset-fashion-mnist"),
    (["--dataset", "mnist", "--data-dir", "{tmp}/none"], "--data-dir"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/none"], "--download"),
    (["--image-size", "4", *TINY], "too small"),
    (["--resume", "{tmp}/garbage.pt", *TINY], "not a loadable checkpoint"),
    (["--unfreeze-at", "layer4", *TINY], "--unfreeze-at"),
    (["--pretrained", "{tmp}/none.pt", *TINY], "none.pt"),
])
def test_bad_input_one_line_exit_2(argv, needle, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    line = _error_line(capsys)
    assert rc == 2 and needle in line, f"rc={rc}, wanted {needle!r} in: {line}"


def test_resume_from_another_model_is_refused(trained_digits_run: Path, capsys):
    rc = main(["--resume", str(trained_digits_run / "last.pt"), "--model", "lenet", "--epochs", "20"])
    assert rc == 2 and "cannot resume" in _error_line(capsys)


def test_subprocess_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "training", "--dataset", "fashion-mnist",
                        "--data-dir", str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip().startswith("error: "), p.stderr


def test_cli_trains_and_resume_inherits_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--head", "32", "--dropout", "0.2", "--out", str(out)]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head"] == [32] and cfg["dropout"] == 0.2 and cfg["image_size"] == 8
    # only --resume and --epochs: model, head, dataset, limit... come from the checkpoint's config
    assert main(["--resume", str(out / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2]


def test_help_lists_registries(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--unfreeze-at" in text and "cifar_cnn_m3" in text and "fashion-mnist" in text
