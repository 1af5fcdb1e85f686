"""The command line: INT8 with its accuracy gate, fp16, the BentoML store, and every bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from export import GateError, export_bundle
from export.backends import cuda_available
from export.cli import main
from imgformat.bundle import load_manifest, verify_files
from training.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).parents[2]


def test_int8_bundle_of_trained_cnn_passes_accuracy_gate(digits_checkpoint, tmp_path):
    out = export_bundle(digits_checkpoint, tmp_path / "b", samples=8, int8=True, calib_samples=128,
                        int8_eval_samples=400)
    m = load_manifest(out)
    verify_files(out, m)
    q = m["int8"]
    assert q["passed"] and m["files"]["model.int8.onnx"]["precision"] == "int8", q
    assert q["calibration_source"] == "dataset digits (train split)" and q["eval_source"] == "dataset digits (test split)"
    assert q["fp32_top1"] > 0.9 and q["int8_top1"] >= q["fp32_top1"] - 0.01, q
    graph = onnx.load(str(out / "model.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert q["settings"]["nodes_kept_float"], "input preprocessing should stay float"


def test_int8_gate_failure_writes_no_bundle(digits_checkpoint, tmp_path):
    # a negative allowance demands INT8 *beat* FP32 by half a point: the gate must refuse
    with pytest.raises(GateError, match="int8 accuracy gate failed") as info:
        export_bundle(digits_checkpoint, tmp_path / "b", samples=4, int8=True, calib_samples=64,
                      int8_eval_samples=200, int8_max_drop=-0.5)
    assert info.value.report["passed"] is False
    assert list(tmp_path.iterdir()) == []


def test_fp16_file_is_recorded(digits_checkpoint, tmp_path):
    out = export_bundle(digits_checkpoint, tmp_path / "b", samples=8, fp16=True)
    m = load_manifest(out)
    assert m["files"]["model.fp16.onnx"]["precision"] == "fp16"
    par = m["fp16"]["parity"]
    assert par["checked"] is cuda_available(), par  # export's own test: the CUDA provider usable here
    if not par["checked"]:
        assert "no CUDA" in par["reason"]
    inp = onnx.load(str(out / "model.fp16.onnx")).graph
    assert inp.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert inp.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in inp.initializer}


def test_cli_bentoml_store(digits_checkpoint, tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "export", str(digits_checkpoint), "--out", str(out), "-n", "8",
                        "--name", "digits", "--version", "v1", "--bentoml"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "parity gate: PASSED" in r.stdout and "digits:v1" in r.stdout, r.stdout
    listed = subprocess.run([sys.executable, "-m", "bentoml", "models", "list"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert "digits" in listed.stdout and "v1" in listed.stdout, listed.stdout + listed.stderr
    code = ("import bentoml, sys; from imgformat.bundle import load_manifest, verify_files;"
            "m = bentoml.models.get('digits:v1'); d = m.path; man = load_manifest(d); verify_files(d, man);"
            "assert m.info.labels['architecture'] == 'simple_cnn', m.info.labels;"
            "assert m.info.metadata['parity_passed'] is True; print('ok')")
    check = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "ok", check.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Bad input: exit status 2, one line on stderr, nothing written
# ---------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message fragment)."""
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    foreign = tmp / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    evil = tmp / "evil.pt"
    torch.save({"format": "imgserve.checkpoint", "payload": _Evil(tmp / "PWNED")}, evil)
    unknown = tmp / "unknown_arch.pt"
    ckpt = load_checkpoint(good)
    ckpt["model"] = {"name": "resnet9000", "kwargs": ckpt["model"]["kwargs"]}
    save_checkpoint(unknown, {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "versions")})
    return {
        "missing": (tmp / "nope.pt", "checkpoint not found"),
        "garbage": (garbage, "not a loadable checkpoint"),
        "truncated": (truncated, "not a loadable checkpoint"),
        "foreign": (foreign, "not an imgserve checkpoint"),
        "pickle-with-code": (evil, "weights_only"),
        "unknown-architecture": (unknown, "unknown model 'resnet9000'; valid models:"),
    }


def _run_main(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "foreign", "pickle-with-code",
                                  "unknown-architecture"])
def test_bad_checkpoint_exit_2_one_line(case, digits_checkpoint, tmp_path, capsys):
    path, fragment = _bad_checkpoints(tmp_path, digits_checkpoint)[case]
    out = tmp_path / "out" / "bundle"
    rc, err = _run_main(capsys, [str(path), "--out", str(out), "-n", "4"])
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "bad input must write nothing"
    assert not (tmp_path / "PWNED").exists(), "the pickle's code ran"


@pytest.mark.parametrize("case", ["parent-is-a-file", "out-is-a-file"])
def test_unwritable_out_exit_2(case, digits_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    out = blocker / "bundle" if case == "parent-is-a-file" else blocker
    rc, err = _run_main(capsys, [str(digits_checkpoint), "--out", str(out), "-n", "4"])
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_text().startswith("a file")


def test_bad_options_exit_2(digits_checkpoint, tmp_path, capsys):
    for extra in (["--name", "../up"], ["--opset", "13"], ["--min-top1", "150"]):
        rc, err = _run_main(capsys, [str(digits_checkpoint), "--out", str(tmp_path / "b"), "-n", "4", *extra])
        assert rc == 2 and err.startswith("error: "), (extra, err)
    assert not (tmp_path / "b").exists()


def test_gate_failure_exit_1(digits_checkpoint, tmp_path, capsys):
    # an impossible tolerance (negative) fails every row: exit 1, the table still printed
    rc = main([str(digits_checkpoint), "--out", str(tmp_path / "b"), "-n", "4", "--atol", "-1", "--rtol", "0"])
    captured = capsys.readouterr()
    assert rc == 1 and "parity gate: FAILED" in captured.out and "parity gate failed" in captured.err
    assert not (tmp_path / "b").exists()
