"""imgformat: torch-free, one reader of both formats, and jsonschema is never silently skipped."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imgformat.bundle import BundleError, validate_manifest
from imgformat.schema import FormatError, check_preprocess
from imgformat.spec import make_preprocess

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("module,forbidden", [
    ("imgformat.bundle", ("torch", "onnx", "training", "export", "service", "numpy", "PIL")),
    ("imgformat.spec", ("torch", "onnx", "training", "export", "service", "numpy", "PIL")),
    ("imgformat.preprocess", ("torch", "torchvision", "onnx", "onnxruntime", "training", "export", "service")),
])
def test_imports_nothing_heavy(module: str, forbidden: tuple[str, ...]) -> None:
    r = _run(f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-1000:]


def test_jsonschema_missing_is_an_import_error_not_a_silent_skip() -> None:
    """service/bundle.py used to skip the schema when jsonschema failed to import; now loading fails."""
    r = _run("import sys; sys.modules['jsonschema'] = None\n"
             "try:\n    import imgformat.bundle\nexcept ImportError as e:\n    print('refused', e)\n"
             "else:\n    print('imported without jsonschema')")
    assert r.stdout.startswith("refused"), r.stdout + r.stderr[-1000:]


def test_service_and_export_read_bundles_with_the_same_code() -> None:
    import export.bundle
    import service.models

    assert service.models.load_bundle.__module__ == "imgformat.bundle"
    assert export.bundle.mf.validate_manifest is validate_manifest


def _manifest(pre: dict) -> dict:
    """A schema-valid manifest around ``pre`` (no files on disk: validation only)."""
    s = pre["input_size"]
    entry = {"sha256": "0" * 64, "bytes": 1, "precision": "fp32"}
    return {"format": "imgserve.bundle", "format_version": 1, "name": "m", "version": "1",
            "architecture": {"name": "x", "kwargs": {}}, "class_names": ["a", "b"], "num_classes": 2,
            "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "height": s, "width": s,
                      "channels": pre["channels"]},
            "output": {"name": "logits", "dtype": "float32", "kind": "logits"},
            "preprocessing": {**pre, "normalization_in_graph": True},
            "files": {"model.onnx": {**entry, "kind": "onnx"}, "model.ts": {**entry, "kind": "torchscript"}},
            "parity": {"passed": True, "samples": 1, "sample_source": "t", "batch_sizes": [1],
                       "tolerances": {"atol": 1e-4, "rtol": 1e-3, "min_top1_agreement": 1.0},
                       "results": [{"backend": "b", "batch_size": 1, "logits_max_abs": 0, "logits_max_rel": 0,
                                    "softmax_max_abs": 0, "softmax_max_rel": 0, "top1_agreement": 1, "passed": True}]},
            "metrics": {}, "source": {"checkpoint": "c.pt", "checkpoint_sha256": "0" * 64},
            "versions": {"imgserve": "0", "torch": "0", "onnx": "0", "onnxruntime": "0"},
            "created": "2026-12-02T15:00:00Z"}


def test_manifest_preprocessing_uses_the_checkpoint_preprocess_schema() -> None:
    pre = make_preprocess(channels=1, input_size=28, mean=[0.3], std=[0.3])
    validate_manifest(_manifest(pre))
    for key, value in [("interpolation", "lanczos"), ("alpha_background", [0, 0]), ("std", [0.0])]:
        with pytest.raises(BundleError, match=f"preprocessing.*{key}|{key}.*preprocessing|preprocessing"):
            validate_manifest(_manifest({**pre, key: value}))
    missing = {k: v for k, v in pre.items() if k != "resize_size"}
    with pytest.raises(BundleError, match="resize_size"):
        validate_manifest(_manifest(missing))


@pytest.mark.parametrize("change,msg", [({"color_mode": "RGB"}, "disagree"), ({"mean": [0.1, 0.2]}, "mean/std"),
                                        ({"resize_policy": "squash"}, "resize_policy"), ({"input_size": 0}, "input_size")])
def test_checkpoint_preprocess_is_checked(change: dict, msg: str) -> None:
    pre = {**make_preprocess(channels=1, input_size=28, mean=[0.3], std=[0.3]), **change}
    with pytest.raises(FormatError, match=msg):
        check_preprocess(pre)


def test_schema_files_are_valid_json_schemas() -> None:
    import jsonschema

    for p in (ROOT / "imgformat" / "schemas").glob("*.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(p.read_text()))
