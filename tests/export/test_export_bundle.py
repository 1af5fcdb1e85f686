"""The bundle of a really trained digits CNN: gate, manifest, hashes, atomic writes, tampering."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import export.bundle as bundle_mod
from export import ExportError, GateError, export_bundle
from export.backends import cuda_available, ort_session
from imgformat.bundle import ManifestError, load_manifest, validate_manifest, verify_files
from training.checkpoint import build_from_checkpoint, load_checkpoint
from training.datasets import get_dataset
from training.transforms import eval_transform

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated in 2.14


@pytest.fixture(scope="module")
def digits_bundle(digits_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(digits_checkpoint, tmp_path_factory.mktemp("b") / "digits", samples=32, version="1")


def test_manifest_validates_and_hashes_match(digits_bundle, digits_checkpoint):
    m = load_manifest(digits_bundle)  # schema + cross-field rules
    verify_files(digits_bundle, m)
    assert set(m["files"]) == {"model.onnx", "model.ts"}, m["files"]
    assert m["input"] == {"name": "image", "dtype": "uint8", "layout": "NHWC", "height": 8, "width": 8, "channels": 1}
    assert m["preprocessing"]["normalization_in_graph"] is True
    assert m["parity"]["passed"] and m["parity"]["samples"] == 32
    assert m["parity"]["sample_source"].startswith("dataset digits"), "parity must use the checkpoint's real data"
    # On a GPU host the gate adds onnxruntime's CUDA provider; elsewhere it says why it skipped it.
    cuda = not any(s.startswith("onnxruntime_cuda") for s in m["parity"].get("skipped", []))
    assert {(r["backend"], r["batch_size"]) for r in m["parity"]["results"]} == \
        {(b, n) for b in ("torchscript", "onnxruntime_cpu", *(("onnxruntime_cuda",) if cuda else ())) for n in (1, 32)}
    assert cuda == cuda_available(), m["parity"].get("skipped")
    assert m["files"]["model.onnx"]["opset"] >= 17
    assert m["metrics"]["test_acc"] > 0.9, "fixture model should be trained"
    assert len(m["source"]["checkpoint_sha256"]) == 64 and m["name"] == "digits_simple_cnn" and m["version"] == "1"
    assert not list(digits_bundle.parent.glob(".*partial")), "temp dir left behind"


def test_onnx_graph_matches_pytorch_eval_pipeline(digits_bundle, digits_checkpoint):
    """uint8 NHWC into the folded graph == training's float eval transform into the bare model."""
    ckpt = load_checkpoint(digits_checkpoint)
    model = build_from_checkpoint(ckpt)
    ds = get_dataset("digits").test
    images = [ds[i][0] for i in range(16)]
    ref_in = torch.stack([eval_transform(ckpt["preprocess"])(im) for im in images])
    with torch.inference_mode():
        ref = model(ref_in).numpy()
    raw = np.stack([np.asarray(im, dtype=np.uint8)[:, :, None] for im in images])
    sess = ort_session(digits_bundle / "model.onnx")
    out = sess.run(["logits"], {"image": raw})[0]
    assert out.dtype == np.float32 and out.shape == (16, 10)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-3)
    ts = torch.jit.load(str(digits_bundle / "model.ts"))
    np.testing.assert_allclose(ts(torch.from_numpy(raw)).detach().numpy(), ref, atol=1e-4, rtol=1e-3)


def test_schema_rejects_broken_manifests(digits_bundle):
    good = json.loads((digits_bundle / "manifest.json").read_text())
    for key, value in [("name", "../evil"), ("format_version", 2), ("num_classes", 11),
                       ("input", {**good["input"], "dtype": "float32"})]:
        with pytest.raises(ManifestError):
            validate_manifest({**good, key: value})
    bad = json.loads(json.dumps(good))
    bad["files"]["model.onnx"]["sha256"] = "xyz"
    with pytest.raises(ManifestError, match="sha256"):
        validate_manifest(bad)
    bad = json.loads(json.dumps(good))
    del bad["preprocessing"]["mean"]
    with pytest.raises(ManifestError, match="mean"):
        validate_manifest(bad)


def test_verify_files_detects_a_changed_file(digits_bundle, tmp_path):
    import shutil

    copy = shutil.copytree(digits_bundle, tmp_path / "copy")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        verify_files(copy, load_manifest(copy))


def _tamper_first_weight(path: Path) -> None:
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # a conv/linear weight
    w = numpy_helper.to_array(init).copy()
    w.flat[: max(1, w.size // 10)] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))


def test_tampered_onnx_weight_fails_gate_and_writes_nothing(digits_checkpoint, tmp_path, monkeypatch, capsys):
    real = bundle_mod.export_onnx

    def tampering(module, example, path, **kw):
        used = real(module, example, path, **kw)
        _tamper_first_weight(path)
        return used

    monkeypatch.setattr(bundle_mod, "export_onnx", tampering)
    out = tmp_path / "tampered"
    with pytest.raises(GateError) as info:
        export_bundle(digits_checkpoint, out, samples=16, echo=print)
    assert not out.exists(), "a failed gate must not leave a bundle"
    assert list(tmp_path.iterdir()) == [], f"leftovers: {list(tmp_path.iterdir())}"
    rows = {(r["backend"], r["batch_size"]): r["passed"] for r in info.value.report["results"]}
    assert rows[("onnxruntime_cpu", 1)] is False and rows[("torchscript", 16)] is True, rows
    assert "parity gate: FAILED" in capsys.readouterr().out


def test_existing_bundle_needs_force(digits_checkpoint, digits_bundle, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--force"):
        export_bundle(digits_checkpoint, out, samples=4)
    assert (out / "keep.txt").exists()
    export_bundle(digits_checkpoint, out, samples=4, force=True)
    assert not (out / "keep.txt").exists() and load_manifest(out)["parity"]["passed"]


def _with_dataset(src: Path, dst: Path, dataset: dict) -> Path:
    from training.checkpoint import save_checkpoint

    ckpt = load_checkpoint(src)
    ckpt["dataset"] = dataset
    return save_checkpoint(dst, {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "versions")})


def test_samples_dir_and_random_fallback(digits_checkpoint, tmp_path, caplog):
    """--samples DIR (class subfolders -> labels) wins; an unreachable dataset falls back to random, loudly."""
    from PIL import Image

    ds = get_dataset("digits").test
    for i in range(12):
        img, label = ds[i]
        (tmp_path / "imgs" / str(label)).mkdir(parents=True, exist_ok=True)
        img.resize((24, 24)).convert("RGB").save(tmp_path / "imgs" / str(label) / f"{i}.png")  # resized + RGB on purpose
    out = export_bundle(digits_checkpoint, tmp_path / "from_dir", samples=10, samples_dir=str(tmp_path / "imgs"))
    assert load_manifest(out)["parity"]["sample_source"] == f"directory {tmp_path / 'imgs'}"

    lost = _with_dataset(digits_checkpoint, tmp_path / "lost" / "best.pt", {"name": "no-such-dataset"})
    with caplog.at_level("WARNING"):
        out = export_bundle(lost, tmp_path / "random", samples=4)
    assert load_manifest(out)["parity"]["sample_source"].startswith("random uint8")
    assert "random pixels" in caplog.text
    with pytest.raises(ExportError, match="labelled real samples"):
        export_bundle(lost, tmp_path / "int8", samples=4, int8=True)
    assert not (tmp_path / "int8").exists()
