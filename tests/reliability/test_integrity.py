"""Integrity: a tampered bundle, an invalid manifest, a name with path characters or a symlink out
of the bundle is refused with a clear message and nothing is loaded; a request cannot name its way
out of the served models.

Every case runs in-process through ``service.models.load_models`` (what the worker runs at
start-up) with the backend factory replaced by a recorder, proving no model file is opened; three
of them also run through a real `bentoml serve`, which must stop with the message instead of
restarting forever.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx
import pytest

from rel_corpus import digit, encode
from service.launcher import start_service
from rel_server import AUTH, server_env


def _manifest(b: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))


def _flip_byte(b: Path) -> None:
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "model.onnx").write_bytes(bytes(data))


def _symlink_out(b: Path, name: str) -> None:
    outside = b.parent / f"outside-{name}"
    shutil.move(b / name, outside)
    (b / name).symlink_to(outside)


def _rename_file(b: Path, new: str) -> None:
    _manifest(b, lambda m: m["files"].__setitem__(new, m["files"].pop("model.onnx")))


# name -> (how to break a copy of the bundle, IMGSERVE_MODELS template, message the refusal must contain)
CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "hash_mismatch": (_flip_byte, "{b}", "sha256 of model.onnx"),
    "size_mismatch": (lambda b: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes() + b"\0"), "{b}",
                      "bytes, manifest says"),
    "model_file_missing": (lambda b: (b / "model.onnx").unlink(), "{b}", "listed in manifest.json but missing"),
    "manifest_not_json": (lambda b: (b / "manifest.json").write_text("{not json"), "{b}", "not valid JSON"),
    "manifest_not_object": (lambda b: (b / "manifest.json").write_text("[]"), "{b}", "not a JSON object"),
    "manifest_missing_files": (lambda b: _manifest(b, lambda m: m.pop("files")), "{b}", "missing keys: files"),
    "manifest_wrong_format": (lambda b: _manifest(b, lambda m: m.update(format="other")), "{b}", "imgserve.bundle v1"),
    "manifest_classes_mismatch": (lambda b: _manifest(b, lambda m: m["class_names"].pop()), "{b}", "class_names for num_classes"),
    "manifest_wrong_input": (lambda b: _manifest(b, lambda m: m["input"].update(dtype="float32")), "{b}", "uint8 NHWC"),
    "name_traversal": (lambda b: _manifest(b, lambda m: m.update(name="../../etc")), "{b}", "must match"),
    "name_slash": (lambda b: _manifest(b, lambda m: m.update(name="a/b")), "{b}", "must match"),
    # the manifest schema (imgformat/schemas/manifest.schema.json) or the path check: either names the entry
    "file_entry_traversal": (lambda b: _rename_file(b, "../model.onnx"), "{b}", "'../model.onnx'"),
    "file_entry_absolute": (lambda b: _rename_file(b, "/etc/passwd"), "{b}", "'/etc/passwd'"),
    "symlink_model_out": (lambda b: _symlink_out(b, "model.onnx"), "{b}", "outside the bundle directory"),
    "symlink_manifest_out": (lambda b: _symlink_out(b, "manifest.json"), "{b}", "outside the bundle directory"),
    "configured_name_traversal": (lambda b: None, "../evil={b}", "must match"),
    "store_tag_traversal": (lambda b: None, "store:../../etc", "not a valid BentoML tag"),
    "store_tag_absolute": (lambda b: None, "store:/etc/passwd", "not a valid BentoML tag"),
    "no_bundle_there": (lambda b: shutil.rmtree(b), "{b}", "no bundle at"),
}


def broken_bundle(rel_bundle: Path, tmp: Path, case: str) -> str:
    """A broken copy of the bundle; returns the IMGSERVE_MODELS value that serves it."""
    b = tmp / case / "bundle"
    shutil.copytree(rel_bundle, b)
    breaker, spec, _ = CASES[case]
    breaker(b)
    return spec.format(b=b)


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_process_nothing_loaded(rel_bundle, tmp_path, monkeypatch, case: str) -> None:
    from service import models
    from imgformat.bundle import BundleError
    from service.config import load_settings

    opened = []
    monkeypatch.setattr(models, "create_backend", lambda *a, **k: opened.append(a) or pytest.fail("backend created"))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml_home"))  # store cases: never the user's store
    settings = load_settings({"IMGSERVE_MODELS": broken_bundle(rel_bundle, tmp_path, case)})
    # BundleError, or ValueError from BentoML's tag check; `bentoml serve` stops on both (service.py)
    with pytest.raises((BundleError, ValueError)) as err:
        models.load_models(settings, executor=None)
    msg = str(err.value)
    assert CASES[case][2] in msg and "\n" not in msg, msg
    assert opened == [], f"{case}: a model was loaded: {opened}"


SERVED_CASES = ("hash_mismatch", "name_traversal", "symlink_model_out")


def test_refused_by_bentoml_serve(rel_bundle, tmp_path) -> None:
    """`bentoml serve` with a broken bundle: never ready, one clear line in its log, and it exits."""
    def attempt(case: str) -> tuple[str, str]:
        spec = broken_bundle(rel_bundle, tmp_path, case)
        log = tmp_path / case / "serve.log"
        try:
            start_service(server_env(Path("unused"), IMGSERVE_MODELS=spec), log, tmp_path / case / "home", timeout_s=150)
        except RuntimeError as e:
            return str(e).splitlines()[0], log.read_text(errors="replace")
        pytest.fail(f"{case}: the server became ready")

    with ThreadPoolExecutor(len(SERVED_CASES)) as pool:
        outcomes = dict(zip(SERVED_CASES, pool.map(attempt, SERVED_CASES)))
    for case, (first_line, log) in outcomes.items():
        assert first_line.startswith("server exited"), f"{case}: {first_line}"
        lines = [ln for ln in log.splitlines() if "imgserve cannot start: " in ln]
        assert lines and CASES[case][2] in lines[0], f"{case}: no clear refusal in the log:\n{log[-2000:]}"
        print(f"\n{case}: {lines[0].split('imgserve cannot start: ', 1)[1]}")


@pytest.mark.parametrize("name", ["../digits", "digits/../digits", "/etc/passwd", "..", "digits\\..\\x", "DIGITS"])
def test_request_model_with_path_characters_is_404(api_server, name: str) -> None:
    r = httpx.post(api_server.url + "/classify", files={"image": ("d.png", encode(digit(), "PNG"), "image/png")},
                   data={"model": name}, headers=AUTH, timeout=30)
    assert r.status_code == 404, r.text
    assert r.json()["models"] == ["digits"] and "served models: digits" in r.json()["error"], r.text
