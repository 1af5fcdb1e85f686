"""Response-body checks shared by the locustfile, the run summary and the tests.

A load test that only counts HTTP 200s proves nothing: every body is read and checked against the
API contract of issue 5, and a wrong body is a failure even with status 200. Each failure carries a
short stable `kind` so failures can be counted by kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

SCORE_EPS = 1e-4   # float32 softmax scores rounded into JSON may sum a hair above 1


class BodyError(Exception):
    """A response body that breaks the contract. `kind` is short and stable (used to group failures)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class ModelInfo:
    """What the client knows about one served model (from GET /models)."""

    name: str
    class_names: tuple[str, ...]
    version: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _class_names(entry: Mapping[str, Any]) -> tuple[str, ...]:
    for key in ("class_names", "classes", "labels"):
        if isinstance(entry.get(key), list):
            return tuple(str(c) for c in entry[key])
    raise BodyError("models_body", f"model entry without class_names: keys {sorted(entry)}")


def parse_models(body: Any) -> tuple[dict[str, ModelInfo], str | None]:
    """GET /models body -> ({name: ModelInfo}, default model name or None)."""
    default = None
    entries: Any = body
    if isinstance(body, Mapping):
        default = body.get("default") or body.get("default_model")
        entries = body.get("models", body)
    if isinstance(entries, Mapping):   # {name: {...}}
        entries = [dict(v, name=v.get("name", k)) for k, v in entries.items() if isinstance(v, Mapping)]
    if not isinstance(entries, list) or not entries:
        raise BodyError("models_body", "no list of models")
    models = {}
    for e in entries:
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str):
            raise BodyError("models_body", "model entry without a name")
        models[e["name"]] = ModelInfo(e["name"], _class_names(e), None if e.get("version") is None else str(e["version"]))
        if default is None and e.get("default") is True:
            default = e["name"]
    return models, default


def check_predictions(preds: Any, *, top_k: int, model: ModelInfo, known_label: str | None = None) -> None:
    """Check one list of predictions: length, labels, indices, scores in [0, 1], sorted, sum <= 1."""
    if not isinstance(preds, list):
        raise BodyError("no_predictions", "predictions is not a list")
    want = min(top_k, model.num_classes)
    if len(preds) != want:
        raise BodyError("wrong_top_k", f"{len(preds)} predictions, asked for {want}")
    total, prev = 0.0, math.inf
    for p in preds:
        if not isinstance(p, Mapping) or not isinstance(p.get("label"), str) or not p["label"]:
            raise BodyError("no_label", f"prediction without a label: {p!r:.80}")
        score, index = p.get("score"), p.get("index")
        if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0 + SCORE_EPS or math.isnan(score):
            raise BodyError("bad_score", f"score {score!r} outside [0, 1]")
        if not isinstance(index, int) or not 0 <= index < model.num_classes:
            raise BodyError("bad_index", f"index {index!r} outside 0..{model.num_classes - 1}")
        if model.class_names[index] != p["label"]:
            raise BodyError("label_index_mismatch", f"index {index} is {model.class_names[index]!r}, label {p['label']!r}")
        if score > prev + 1e-7:
            raise BodyError("not_sorted", "scores not highest first")
        prev = score
        total += score
    if total > 1.0 + SCORE_EPS:
        raise BodyError("scores_sum", f"scores sum to {total:.6f} > 1")
    if len({p["index"] for p in preds}) != len(preds):
        raise BodyError("duplicate_index", "the same class twice")
    if known_label is not None and preds[0]["label"] != known_label:
        raise BodyError("wrong_label", f"known image classified {preds[0]['label']!r}, expected {known_label!r}")


def check_classify_body(body: Any, *, models: Mapping[str, ModelInfo], requested: str | None, default: str | None,
                        top_k: int, known_label: str | None = None) -> ModelInfo:
    """Check a POST /classify answer; returns the model that answered. Raises BodyError."""
    if not isinstance(body, Mapping):
        raise BodyError("bad_json", "body is not a JSON object")
    name = body.get("model")
    if name not in models:
        raise BodyError("wrong_model", f"answered by {name!r}, not a served model")
    if requested is not None and name != requested:
        raise BodyError("wrong_model", f"asked {requested!r}, answered by {name!r}")
    if requested is None and default is not None and name != default:
        raise BodyError("wrong_model", f"no model asked, answered by {name!r} instead of the default {default!r}")
    model = models[name]
    if model.version is not None and str(body.get("version")) != model.version:
        raise BodyError("wrong_version", f"version {body.get('version')!r}, /models says {model.version!r}")
    check_predictions(body.get("predictions"), top_k=top_k, model=model, known_label=known_label)
    return model


def batch_items(body: Any) -> list[Any]:
    """The per-image results of a POST /classify_batch answer (a list, or an object with `results`)."""
    if isinstance(body, list):
        return body
    if isinstance(body, Mapping) and isinstance(body.get("results"), list):
        return body["results"]
    raise BodyError("bad_json", "batch body has no list of results")


def check_batch_body(body: Any, *, models: Mapping[str, ModelInfo], requested: str | None, default: str | None,
                     top_k: int, known_labels: Sequence[str | None]) -> None:
    """Check a POST /classify_batch answer: one result per image, in order, each a valid classification."""
    items = batch_items(body)
    if len(items) != len(known_labels):
        raise BodyError("wrong_batch_length", f"{len(items)} results for {len(known_labels)} images")
    for item, label in zip(items, known_labels):
        if isinstance(item, Mapping) and "model" not in item and isinstance(body, Mapping) and "model" in body:
            item = dict(item, model=body["model"], version=body.get("version"))   # model named once per batch
        check_classify_body(item, models=models, requested=requested, default=default, top_k=top_k, known_label=label)


def check_error_body(status: int, body: Any, expected: frozenset[int]) -> None:
    """A deliberately bad request: the status must be one the contract allows, with a JSON error message."""
    if 200 <= status < 300:
        raise BodyError("bad_input_accepted", f"HTTP {status} for a bad input")
    if status not in expected:
        raise BodyError("wrong_error_status", f"HTTP {status}, expected {sorted(expected)}")
    if not isinstance(body, Mapping) or not isinstance(body.get("error"), str) or not body["error"]:
        raise BodyError("no_error_message", "error body is not JSON with an 'error' message")
