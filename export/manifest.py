"""Read and check bundle manifests (docs/FORMATS.md). Imports only json, hashlib and jsonschema.

The service imports this module to load a bundle, so it must never pull in torch, onnx or the
training package: ``from export.manifest import load_manifest, verify_files``.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

FORMAT = "imgserve.bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class ManifestError(ValueError):
    """A bundle whose manifest is missing, malformed, or whose files do not match it (one-line message)."""


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The JSON Schema every manifest validates against (export/manifest.schema.json)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """Validate ``manifest`` against the schema plus cross-field rules; return it unchanged.

    Raises ManifestError naming the first offending field.
    """
    try:
        jsonschema.validate(manifest, load_schema(), cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ManifestError(f"manifest field {where}: {e.message}") from None
    # Rules JSON Schema cannot express: counts and shapes that must agree with each other.
    pre, inp = manifest["preprocessing"], manifest["input"]
    if len(manifest["class_names"]) != manifest["num_classes"]:
        raise ManifestError(f"manifest has {len(manifest['class_names'])} class_names but num_classes="
                            f"{manifest['num_classes']}")
    if not (inp["height"] == inp["width"] == pre["input_size"]) or inp["channels"] != pre["channels"]:
        raise ManifestError("manifest input shape disagrees with preprocessing (input_size/channels)")
    if len(pre["mean"]) != pre["channels"] or len(pre["std"]) != pre["channels"]:
        raise ManifestError(f"manifest preprocessing needs {pre['channels']} mean/std values")
    if (pre["color_mode"] == "L") != (pre["channels"] == 1):
        raise ManifestError("manifest color_mode and channels disagree")
    for name in manifest["files"]:
        if os.path.basename(name) != name or name in (".", ".."):
            raise ManifestError(f"manifest file name {name!r} must be a plain file name")
    return manifest


def load_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``bundle_dir/manifest.json``. Raises ManifestError (one line) on any problem."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{bundle_dir} is not a bundle: no {MANIFEST_NAME} (create one with: python -m export CHECKPOINT --out DIR)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    return validate_manifest(manifest)


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


def verify_files(bundle_dir: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check size and sha256 of the bundle's files (all, or only ``names``). Raises ManifestError."""
    bundle_dir = Path(bundle_dir)
    for name in names if names is not None else list(manifest["files"]):
        entry = manifest["files"].get(name)
        if entry is None:
            raise ManifestError(f"{name} is not listed in {bundle_dir / MANIFEST_NAME}")
        path = bundle_dir / name
        if not path.is_file():
            raise ManifestError(f"bundle file missing: {path}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ManifestError(f"{path} has {size} bytes, manifest says {entry['bytes']}: re-export the bundle")
        if sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{path} sha256 does not match the manifest: the file was changed; re-export the bundle")
