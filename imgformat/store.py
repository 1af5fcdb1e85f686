"""The bundle's second home: a finished bundle imported into the local BentoML model store.

Written by ``python -m export ... --bentoml`` and by ``make image`` (container/), read by the service.

The model's directory receives the bundle files unchanged (manifest.json included), so the service
can ``bentoml.models.get("NAME:VERSION").path`` and load it like any bundle directory. The store
lives under ``$BENTOML_HOME`` (default ~/bentoml).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from imgformat.bundle import MANIFEST_NAME, load_manifest, verify_files

log = logging.getLogger(__name__)


class StoreError(ValueError):
    """The store already holds this name:version and replacing it was not asked for."""


def store_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest subset shown by ``bentoml models get``: enough to pick a model, not to serve it."""
    metrics = manifest.get("metrics") or {}
    test_acc = next((metrics[k] for k in ("test_acc", "test_accuracy", "final_test_acc") if
                     isinstance(metrics.get(k), (int, float))), None)
    meta = {
        "format": manifest["format"], "format_version": manifest["format_version"],
        "architecture": manifest["architecture"]["name"], "num_classes": manifest["num_classes"],
        "class_names": manifest["class_names"], "input": manifest["input"],
        "preprocessing": manifest["preprocessing"],
        "files": {k: {"sha256": v["sha256"], "precision": v["precision"]} for k, v in manifest["files"].items()},
        "parity_passed": manifest["parity"]["passed"], "created": manifest["created"],
        "checkpoint_sha256": manifest["source"]["checkpoint_sha256"],
    }
    if test_acc is not None:
        meta["test_acc"] = float(test_acc)
    if "int8" in manifest:
        meta["int8_top1"] = manifest["int8"]["int8_top1"]
    return meta


def store_labels(manifest: dict[str, Any]) -> dict[str, str]:
    return {"imgserve": "bundle", "architecture": manifest["architecture"]["name"],
            "dataset": str((manifest.get("dataset") or {}).get("name") or "unknown"),
            "precisions": "-".join(sorted({v["precision"] for v in manifest["files"].values()}))}


def import_to_bentoml(bundle_dir: str | os.PathLike, *, replace: bool = False, name: str | None = None) -> str:
    """Copy the bundle into the BentoML model store as ``NAME:VERSION``; returns the tag string.
    `name` stores it under another store name (the one a bento bakes in) without touching the
    manifest: the service still serves it under the manifest's name."""
    import bentoml
    from bentoml.exceptions import NotFound

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    tag = f"{name or manifest['name']}:{manifest['version']}"
    try:
        bentoml.models.get(tag)
        if not replace:
            raise StoreError(f"BentoML model {tag} already exists: pass --version or --force to replace it")
        bentoml.models.delete(tag)
    except NotFound:
        pass
    with bentoml.models.create(tag, labels=store_labels(manifest), metadata=store_metadata(manifest)) as model:
        dest = Path(model.path)
        for name in [MANIFEST_NAME, *manifest["files"]]:
            shutil.copy2(bundle_dir / name, dest / name)
        verify_files(dest, manifest)  # the copy is what the service will load
    log.info("imported %s into the BentoML model store at %s", tag, dest)
    return tag
