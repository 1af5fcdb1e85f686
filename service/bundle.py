"""Read a bundle directory (docs/FORMATS.md) safely: manifest checks, file hashes, file choice.

No torch here. When export/manifest.py is importable, its ``validate_manifest`` (the JSON Schema)
is used as well; the checks below are the ones serving cannot do without.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
REQUIRED = ("format", "format_version", "name", "version", "class_names", "num_classes", "input",
            "output", "preprocessing", "files")


class BundleError(ValueError):
    """A bundle that must not be served; the message says what is wrong and where."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def model_file(self, kind: str, precision: str) -> Path:
        """The file of ``kind`` ("onnx"/"torchscript") and ``precision``; verified against its hash."""
        for fname, meta in self.manifest["files"].items():
            if meta.get("kind") == kind and meta.get("precision", "fp32") == precision:
                return verify_file(self.path, fname, meta)
        have = [f"{m.get('kind')}/{m.get('precision', 'fp32')}" for m in self.manifest["files"].values()]
        hint = " (re-export with --int8)" if precision == "int8" else ""
        raise BundleError(f"bundle {self.path} has no {kind}/{precision} model file{hint}; it has: {', '.join(have)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(root: Path, fname: str, meta: dict[str, Any]) -> Path:
    """Resolve ``fname`` inside ``root`` (no escaping it) and check its size and sha256."""
    if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
        raise BundleError(f"bundle {root}: file name {fname!r} has path characters")
    path = _inside(root, fname)
    if not path.is_file():
        raise BundleError(f"bundle {root}: {fname} is listed in manifest.json but missing")
    if "bytes" in meta and path.stat().st_size != int(meta["bytes"]):
        raise BundleError(f"bundle {root}: {fname} is {path.stat().st_size} bytes, manifest says {meta['bytes']}")
    digest = _sha256(path)
    if digest != meta.get("sha256"):
        raise BundleError(f"bundle {root}: sha256 of {fname} is {digest[:12]}..., manifest says "
                          f"{str(meta.get('sha256'))[:12]}... (file changed after export: re-export it)")
    return path


def _inside(root: Path, fname: str) -> Path:
    """``root / fname``, refused when a symlink makes it resolve outside the bundle directory."""
    path = root / fname
    real, base = path.resolve(), root.resolve()
    if not real.is_relative_to(base):
        raise BundleError(f"bundle {root}: {fname} resolves to {real}, outside the bundle directory "
                          "(symlinks out of a bundle are refused: copy the file into it)")
    return path


def _schema_validate(manifest: dict[str, Any], where: Path) -> None:
    try:
        from export.manifest import validate_manifest  # the JSON Schema, when export is installed
    except ImportError:
        return
    try:
        validate_manifest(manifest)
    except Exception as e:
        raise BundleError(f"{where}: invalid manifest: {str(e).splitlines()[0]}") from None


def load_bundle(path: str | Path) -> Bundle:
    """Load and check ``path/manifest.json``. Model files are hash-checked when chosen."""
    root = Path(path)
    mpath = _inside(root, "manifest.json")
    if not mpath.is_file():
        raise BundleError(f"no bundle at {root} (manifest.json missing): export one with "
                          f"`python -m export runs/default/best.pt --out {root}`")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} is not a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{mpath} is missing keys: {', '.join(missing)}")
    if manifest["format"] != "imgserve.bundle" or manifest["format_version"] != 1:
        raise BundleError(f"{mpath}: format {manifest['format']!r} v{manifest['format_version']!r}; "
                          "this service reads imgserve.bundle v1")
    if not isinstance(manifest["name"], str) or not NAME_RE.match(manifest["name"]):
        raise BundleError(f"{mpath}: model name {manifest['name']!r} must match {NAME_RE.pattern}")
    inp = manifest["input"]
    if inp.get("dtype") != "uint8" or inp.get("layout") != "NHWC":
        raise BundleError(f"{mpath}: input must be uint8 NHWC raw pixels, got {inp.get('dtype')} {inp.get('layout')}")
    if len(manifest["class_names"]) != manifest["num_classes"]:
        raise BundleError(f"{mpath}: {len(manifest['class_names'])} class_names for num_classes={manifest['num_classes']}")
    _schema_validate(manifest, mpath)
    return Bundle(root, manifest)
