"""Read, validate and verify a bundle directory (docs/FORMATS.md): the one reader of the format.

export/ writes bundles with ``file_entry`` and checks them with ``load_manifest`` + ``verify_files``
before publishing; the service loads them with ``load_bundle`` and hash-checks the one model file
it is about to open (``Bundle.model_file``). Imports json, hashlib, jsonschema: never torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgformat.constants import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST_NAME, NAME_RE
from imgformat.schema import MANIFEST_SCHEMA, check

MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KB; a bigger one is no manifest, and is not read

# The keys checked first, with messages written for a person serving a bundle; the schema follows.
REQUIRED = ("format", "format_version", "name", "version", "class_names", "num_classes", "input",
            "output", "preprocessing", "files")


class BundleError(ValueError):
    """A bundle that must not be served or published; the one-line message says what and where."""


ManifestError = BundleError  # the name export/ and its tests use


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def model_file(self, kind: str, precision: str, max_bytes: int | None = None) -> Path:
        """The file of ``kind`` ("onnx"/"torchscript") and ``precision``; verified against its hash
        (and refused before hashing when it is over ``max_bytes``)."""
        for fname, meta in self.manifest["files"].items():
            if meta.get("kind") == kind and meta.get("precision", "fp32") == precision:
                return verify_file(self.path, fname, meta, max_bytes)
        have = [f"{m.get('kind')}/{m.get('precision', 'fp32')}" for m in self.manifest["files"].values()]
        hint = " (re-export with --int8)" if precision == "int8" else ""
        raise BundleError(f"bundle {self.path} has no {kind}/{precision} model file{hint}; it has: {', '.join(have)}")

    def unchecked(self, precision: str) -> list[str]:
        """Why serving ``precision`` from this bundle would be unproven: each gate the manifest
        records as failed, or as never run for that precision. Empty when every gate passed."""
        m, why = self.manifest, []
        if not m["parity"].get("passed"):
            why.append("its parity gate failed")
        gate = GATES.get(precision)
        if gate is not None:
            why += gate(m)
        return why


def _int8_gate(m: dict[str, Any]) -> list[str]:
    if "int8" not in m:
        return ["its INT8 file has no accuracy gate report"]
    return [] if m["int8"].get("passed") else [f"its INT8 accuracy gate failed (drop over {m['int8'].get('max_drop')} points)"]


def _fp16_gate(m: dict[str, Any]) -> list[str]:
    parity = (m.get("fp16") or {}).get("parity") or {}
    if not parity.get("checked"):
        return [f"its FP16 file was never checked on a GPU ({parity.get('reason', 'no FP16 parity report')})"]
    return [] if parity.get("passed", False) else ["its FP16 parity gate failed"]


# precision -> the manifest's gate for that precision's file (FP32's is the parity gate, always checked)
GATES = {"int8": _int8_gate, "fp16": _fp16_gate}


# -- the manifest -------------------------------------------------------------------------------
def validate_manifest(manifest: Any, where: str | os.PathLike = "manifest") -> dict[str, Any]:
    """Check a manifest (friendly checks, the JSON Schema, cross-field rules); return it unchanged."""
    _check_basics(manifest, where)
    check(manifest, MANIFEST_SCHEMA, f"{where}: invalid manifest", BundleError)
    _check_cross_fields(manifest, where)
    return manifest


def _check_basics(m: Any, where: str | os.PathLike) -> None:
    if not isinstance(m, dict):
        raise BundleError(f"{where} is not a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise BundleError(f"{where} is missing keys: {', '.join(missing)}")
    if m["format"] != BUNDLE_FORMAT or m["format_version"] != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{where}: format {m['format']!r} v{m['format_version']!r}; "
                          f"this imgserve reads {BUNDLE_FORMAT} v{BUNDLE_FORMAT_VERSION}")
    if not isinstance(m["name"], str) or not NAME_RE.match(m["name"]):
        raise BundleError(f"{where}: model name {m['name']!r} must match {NAME_RE.pattern}")
    inp = m["input"] if isinstance(m["input"], dict) else {}
    if inp.get("dtype") != "uint8" or inp.get("layout") != "NHWC":
        raise BundleError(f"{where}: input must be uint8 NHWC raw pixels, got {inp.get('dtype')} {inp.get('layout')}")
    if isinstance(m["class_names"], list) and len(m["class_names"]) != m["num_classes"]:
        raise BundleError(f"{where}: {len(m['class_names'])} class_names for num_classes={m['num_classes']}")


def _check_cross_fields(m: dict[str, Any], where: str | os.PathLike) -> None:
    """Rules JSON Schema cannot express: counts and shapes that must agree with each other."""
    pre, inp = m["preprocessing"], m["input"]
    if not (inp["height"] == inp["width"] == pre["input_size"]) or inp["channels"] != pre["channels"]:
        raise BundleError(f"{where}: input shape disagrees with preprocessing (input_size/channels)")
    if len(pre["mean"]) != pre["channels"] or len(pre["std"]) != pre["channels"]:
        raise BundleError(f"{where}: preprocessing needs {pre['channels']} mean/std values")
    if (pre["color_mode"] == "L") != (pre["channels"] == 1):
        raise BundleError(f"{where}: preprocessing color_mode and channels disagree")
    for name in m["files"]:
        if os.path.basename(name) != name or name in (".", ".."):
            raise BundleError(f"{where}: file name {name!r} has path characters")
    ref = m.get("reference_stats")
    if ref is not None:
        _check_reference_stats(ref, m["num_classes"], pre["channels"], where)


def _check_reference_stats(ref: dict[str, Any], num_classes: int, channels: int, where: str | os.PathLike) -> None:
    """The section's histograms must fit the model: one count per class, one bin count per bin."""
    true = ref.get("true_class_counts")
    if len(ref["predicted_class_counts"]) != num_classes or (true is not None and len(true) != num_classes):
        raise BundleError(f"{where}: reference_stats class counts need {num_classes} entries")
    if len(ref["confidence_counts"]) != ref["confidence_bins"]:
        raise BundleError(f"{where}: reference_stats confidence_counts needs confidence_bins entries")
    if len(ref["channel_mean"]) != channels or len(ref["channel_std"]) != channels:
        raise BundleError(f"{where}: reference_stats needs {channels} channel_mean/channel_std values")


def load_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``bundle_dir/manifest.json`` (not the model files: ``verify_files``)."""
    root = Path(bundle_dir)
    mpath = _inside(root, MANIFEST_NAME)
    if not mpath.is_file():
        raise BundleError(f"no bundle at {root} ({MANIFEST_NAME} missing): export one with "
                          f"`python -m export runs/default/best.pt --out {root}`")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is {mpath.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES} a manifest may have")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BundleError(f"{mpath} is not valid JSON: {e}") from None
    return validate_manifest(manifest, mpath)


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and check ``path/manifest.json``. Model files are hash-checked when chosen."""
    return Bundle(Path(path), load_manifest(path))


# -- the files ----------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model files can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | os.PathLike, kind: str, precision: str, **extra: Any) -> dict[str, Any]:
    """The manifest's ``files`` entry for one file: sha256, size, kind, precision (+ extra fields)."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path), "kind": kind, "precision": precision, **extra}


def verify_file(root: str | os.PathLike, fname: str, meta: dict[str, Any], max_bytes: int | None = None) -> Path:
    """Resolve ``fname`` inside ``root`` (no escaping it) and check its size (at most ``max_bytes``)
    and sha256."""
    root = Path(root)
    if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
        raise BundleError(f"bundle {root}: file name {fname!r} has path characters")
    path = _inside(root, fname)
    if not path.is_file():
        raise BundleError(f"bundle {root}: {fname} is listed in {MANIFEST_NAME} but missing")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise BundleError(f"bundle {root}: {fname} is {path.stat().st_size} bytes, over the limit of {max_bytes} "
                          "(IMGSERVE_MAX_MODEL_BYTES)")
    if "bytes" in meta and path.stat().st_size != int(meta["bytes"]):
        raise BundleError(f"bundle {root}: {fname} is {path.stat().st_size} bytes, manifest says {meta['bytes']}")
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise BundleError(f"bundle {root}: sha256 of {fname} is {digest[:12]}..., manifest says "
                          f"{str(meta.get('sha256'))[:12]}... (file changed after export: re-export it)")
    return path


def verify_files(bundle_dir: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check size and sha256 of the bundle's files (all, or only ``names``). Raises BundleError."""
    for name in names if names is not None else list(manifest["files"]):
        entry = manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"{name} is not listed in {Path(bundle_dir) / MANIFEST_NAME}")
        verify_file(bundle_dir, name, entry)


def _inside(root: Path, fname: str) -> Path:
    """``root / fname``, refused when a symlink makes it resolve outside the bundle directory."""
    path = root / fname
    real, base = path.resolve(), root.resolve()
    if not real.is_relative_to(base):
        raise BundleError(f"bundle {root}: {fname} resolves to {real}, outside the bundle directory "
                          "(symlinks out of a bundle are refused: copy the file into it)")
    return path


def explain_weights(bundle: Bundle) -> "Any":
    """The CAM classifier weights (num_classes, K) of an explainable bundle, hash-checked; None when
    the manifest says the model has no explanations (``explain.supported`` false or absent)."""
    import numpy as np

    ex = bundle.manifest.get("explain") or {}
    if not ex.get("supported"):
        return None
    w = ex["weights"]
    path = verify_file(bundle.path, w["file"], w)
    weights = np.load(path, allow_pickle=False)
    if weights.ndim != 2 or weights.shape[0] != bundle.manifest["num_classes"] \
            or weights.shape[1] != ex["feature_shape"][0]:
        raise BundleError(f"bundle {bundle.path}: {w['file']} has shape {weights.shape}, expected "
                          f"({bundle.manifest['num_classes']}, {ex['feature_shape'][0]})")
    return weights
