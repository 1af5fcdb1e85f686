"""Loading without a server: config parsing, bundle integrity, backends agree."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.backends import create_backend, list_backends
from imgformat.bundle import BundleError, load_bundle
from service.config import ConfigError, load_settings, parse_models


def test_parse_models() -> None:
    got = parse_models("bundles/default, r18=bundles/r18,store:default:latest,x=store:m:1")
    assert [(m.name, m.location, m.store) for m in got] == [
        (None, "bundles/default", False), ("r18", "bundles/r18", False), (None, "default:latest", True), ("x", "m:1", True)]


@pytest.mark.parametrize("env,msg", [({"IMGSERVE_BACKEND": "tensorflow"}, "onnx, torchscript"),
                                     ({"IMGSERVE_MAX_BATCH_SIZE": "lots"}, "not an integer"),
                                     ({"IMGSERVE_BATCHER": "x"}, "bentoml, eager"),
                                     ({"IMGSERVE_MODELS": ","}, "IMGSERVE_MODELS is empty"),
                                     ({"IMGSERVE_WORKERS": "many"}, "not an integer"),
                                     ({"IMGSERVE_WORKERS": "2", "IMGSERVE_MODEL_CONTROL": "explicit",
                                       "IMGSERVE_API_KEY": "k"}, "needs IMGSERVE_WORKERS=1"),
                                     ({"IMGSERVE_MODEL_CONTROL": "explicit"}, "explicit needs an API key"),
                                     ({"IMGSERVE_MODEL_ROOT": "/no/such/dir"}, "is not a directory")])
def test_bad_settings_name_the_fix(env: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load_settings(env)


def test_workers_share_the_cores() -> None:
    from service.cpus import cpu_count

    assert load_settings({}).workers == 1 and load_settings({}).threads == cpu_count()
    s = load_settings({"IMGSERVE_WORKERS": "cores"})
    assert s.workers == cpu_count() and s.threads == 1
    assert load_settings({"IMGSERVE_WORKERS": "2", "IMGSERVE_THREADS": "3"}).threads == 3


def test_settings_never_show_the_key() -> None:
    assert "hunter2" not in repr(load_settings({"IMGSERVE_API_KEY": "hunter2"}))


def test_api_key_from_a_mounted_file(tmp_path: Path) -> None:
    """IMGSERVE_API_KEY_FILE: the key comes from a file (a container secret), never from an image layer."""
    secret = tmp_path / "api-key"
    secret.write_text("s3cret-from-file\n")
    assert load_settings({"IMGSERVE_API_KEY_FILE": str(secret)}).api_key == "s3cret-from-file"
    with pytest.raises(ConfigError, match="not both"):
        load_settings({"IMGSERVE_API_KEY_FILE": str(secret), "IMGSERVE_API_KEY": "x"})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings({"IMGSERVE_API_KEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings({"IMGSERVE_API_KEY_FILE": str(tmp_path / "empty")})


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_file_is_refused(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 of model.onnx"):
        load_bundle(b).model_file("onnx", "fp32")


@pytest.mark.parametrize("change,msg", [({"name": "../evil"}, "name|invalid manifest"),
                                        ({"format": "other"}, "format|invalid manifest"),
                                        ({"files": {"../model.onnx": {"sha256": "0", "bytes": 1, "kind": "onnx", "precision": "fp32"}}},
                                         "path characters|invalid manifest")])
def test_bad_manifest_is_refused(bundle: Path, tmp_path: Path, change: dict, msg: str) -> None:
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m.update(change)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=msg):
        load_bundle(b).model_file("onnx", "fp32")


def test_missing_bundle_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="python -m export"):
        load_bundle(tmp_path / "nope")


def test_missing_precision_lists_files(bundle: Path) -> None:
    with pytest.raises(BundleError, match="no onnx/fp16 model file.*it has: onnx/fp32"):
        load_bundle(bundle).model_file("onnx", "fp16")


def test_int8_model_serves_the_same_classes(bundle: Path) -> None:
    """IMGSERVE_PRECISION=int8 loads model.int8.onnx; its top-1 matches FP32 on held-out digits."""
    from concurrent.futures import ThreadPoolExecutor

    from service.config import load_settings
    from service.models import load_model
    from svc_factory import digit_uploads, png_bytes

    settings = load_settings({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_PRECISION": "int8", "IMGSERVE_THREADS": "1"})
    with ThreadPoolExecutor(1) as pool:
        m8 = load_model(settings.models[0], settings, pool)
        m32 = load_model(settings.models[0], load_settings({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_THREADS": "1"}), pool)
    assert m8.file.name != m32.file.name and m8.bundle.manifest["files"][m8.file.name]["precision"] == "int8"
    imgs, labels = digit_uploads(100)
    x = np.stack([m8.preprocessor(png_bytes(im)) for im in imgs])
    agree = (m8.backend.run(x).argmax(1) == m32.backend.run(x).argmax(1)).mean()
    assert agree >= 0.9, f"INT8 top-1 agrees with FP32 on only {agree:.0%} of held-out digits"


@pytest.mark.parametrize("name", list_backends())
def test_backends_agree_with_each_other(bundle: Path, name: str) -> None:
    b = load_bundle(bundle)
    kind = "onnx" if name == "onnx" else "torchscript"
    be = create_backend(name, b.model_file(kind, "fp32"), threads=1, device="cpu")
    ref = create_backend("onnx", b.model_file("onnx", "fp32"), threads=1, device="cpu")
    x = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)
    out = be.run(x)
    assert out.shape == (5, 10) and out.dtype == np.float32 and be.device == "cpu"
    np.testing.assert_allclose(out, ref.run(x), atol=1e-4, rtol=1e-4, err_msg=f"{name} disagrees with onnx")


@pytest.mark.parametrize("env, inline, threads", [
    ({}, True, 1),                                   # tiny digits CNN: batches on the loop, one thread
    ({"IMGSERVE_THREADS": "2"}, True, 2),            # an explicit thread count is kept
    ({"IMGSERVE_SMALL_MODEL_MS": "0"}, False, None),  # tuning off: the inference thread, a thread per core
])
def test_small_models_run_on_the_event_loop_with_one_thread(bundle: Path, env: dict, inline: bool,
                                                             threads: int | None, monkeypatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import service.models as models
    from service.config import load_settings

    monkeypatch.setattr(models, "create_backend", _recording(models.create_backend))
    settings = load_settings({"IMGSERVE_MODELS": str(bundle), **env})
    threads = threads or settings.threads
    with ThreadPoolExecutor(1) as pool:
        (m,) = models.load_models(settings, pool)
    assert m.batcher.inline is inline
    if m.backend.device != "cpu" and "IMGSERVE_THREADS" not in env:
        threads = settings.threads  # on a GPU the CPU intra-op threads are not retuned (models._tune_small_model)
    assert m.backend_threads == threads == _recording.last_threads
    x = np.zeros((3, *m.preprocessor.shape), np.uint8)
    assert m.batcher.run(x).shape == (3, len(m.class_names))


def _recording(create):
    def wrapped(*a, **kw):
        _recording.last_threads = kw["threads"]
        return create(*a, **kw)
    return wrapped


def test_a_version_label_names_the_served_version(bundle: Path) -> None:
    """NAME@VERSION=DIR serves the bundle under that version label; without one, the manifest's version."""
    from concurrent.futures import ThreadPoolExecutor

    from service.models import load_model

    settings = load_settings({"IMGSERVE_MODELS": f"digits@canary={bundle},{bundle}", "IMGSERVE_THREADS": "1"})
    with ThreadPoolExecutor(1) as pool:
        labelled, plain = (load_model(src, settings, pool) for src in settings.models)
    assert (labelled.name, labelled.version) == ("digits", "canary")
    assert plain.version == str(plain.bundle.manifest["version"]) != "canary"
