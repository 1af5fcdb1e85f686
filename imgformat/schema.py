"""The JSON Schemas of both formats (imgformat/schemas/) and checks that raise one-line errors.

jsonschema is a hard dependency: a manifest is never accepted unchecked because a library failed
to import.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).with_name("schemas")
MANIFEST_SCHEMA = "manifest.schema.json"
PREPROCESS_SCHEMA = "preprocess.schema.json"


class FormatError(ValueError):
    """A manifest or preprocess dict that breaks its format; the message names the field."""


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """One of the schemas by file name (``MANIFEST_SCHEMA``, ``PREPROCESS_SCHEMA``)."""
    return json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _registry() -> Registry:
    # The manifest's `preprocessing` refers to the preprocess schema by its $id.
    pre = load_schema(PREPROCESS_SCHEMA)
    return Registry().with_resource(pre["$id"], Resource.from_contents(pre))


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(name), registry=_registry())


def check(instance: Any, name: str, what: str, error: type[ValueError] = FormatError) -> None:
    """Validate ``instance`` against schema ``name``; raise ``error`` naming the first bad field."""
    best = jsonschema.exceptions.best_match(_validator(name).iter_errors(instance))
    if best is not None:
        where = "/".join(str(p) for p in best.absolute_path) or "(top level)"
        raise error(f"{what} field {where}: {best.message}")


def check_preprocess(pre: Any, what: str = "preprocess", error: type[ValueError] = FormatError) -> None:
    """The checkpoint's ``preprocess`` dict: schema plus the rules a schema cannot say."""
    check(pre, PREPROCESS_SCHEMA, what, error)
    channels = pre["channels"]
    if (pre["color_mode"] == "L") != (channels == 1):
        raise error(f"{what}: color_mode {pre['color_mode']!r} and channels {channels} disagree")
    if len(pre["mean"]) != channels or len(pre["std"]) != channels:
        raise error(f"{what}: needs {channels} mean/std values, got {len(pre['mean'])}/{len(pre['std'])}")
