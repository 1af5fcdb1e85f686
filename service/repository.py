"""Triton's model repository extension: index, load (or reload: a new version) and unload models.

    POST /v2/repository/index                       {"ready": true}?
    POST /v2/repository/models/NAME/load            {"parameters": {"bundle": DIR} | {"store": TAG}, "version": V?}?
    POST /v2/repository/models/NAME/unload          {"parameters": {"version": V}}?

A load without ``version`` replaces every version of the name; with it, that version is added
beside the others (or replaced). An unload without ``version`` removes every version of the name.
A version the traffic policy in force still sends traffic to is not removed (409, docs/rollouts.md).

Off unless IMGSERVE_MODEL_CONTROL=explicit (Triton's name for the same switch), and behind the API
key when one is set (the guard middleware). A load runs every check of start-up (manifest, sha256,
warm-up output shape) in a thread; the event loop keeps serving the old version meanwhile. Then one
dict assignment on the event loop switches the name to the new model: a request resolves its
model once, right before admission, so requests admitted earlier finish on the old version and
later ones use the new one. The old model is dropped once its last admitted request is answered.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import re
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from imgformat.constants import NAME_RE
from service import jsonbounds
from service.answer import answer, current_service
from service.config import ModelSource
from service.errors import Refused
from service.io import TOO_LARGE_KEY, json_response
from service.models import ServedModel, load_ready_model, malloc_trim

logger = logging.getLogger(__name__)
MAX_VALUES = 64  # JSON values in a repository request: a few parameters
_ABSOLUTE_PATH = re.compile(r"(?<![\w.<>])/[^\s'\",:()]+")


class ModelRepository:
    """The service's loaded models (its own ``models`` dict) and where each one came from."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.versions = svc.versions  # every (name, version) served (service.versions)
        self.sources: dict[str, ModelSource] = {n: m.source for n, m in svc.models.items() if m.source is not None}
        self.unavailable: dict[str, str] = {}  # name -> why it is not loaded
        self._lock = asyncio.Lock()  # one load or unload at a time

    def index(self, ready_only: bool) -> list[dict[str, str]]:
        rows = [{"name": n, "version": v, "state": "READY", "reason": ""}
                for n, versions in self.versions.by_name.items() for v in versions]
        if not ready_only:
            rows += [{"name": n, "state": "UNAVAILABLE", "reason": r} for n, r in self.unavailable.items()
                     if n not in self.versions.by_name]
        return rows

    async def load(self, name: str, params: dict) -> ServedModel:
        if not NAME_RE.match(name):
            raise Refused(f"model name {name!r} must match {NAME_RE.pattern}", 400, "bad_model_name")
        label = _label(params)
        src = _under_root(name, _source(name, params), self.svc.settings.model_root) or self.sources.get(name)
        if src is None:
            raise Refused(f"model {name!r} is not known here: give its bundle, "
                          '{"parameters": {"bundle": "DIR under the model root"}} or {"parameters": {"store": "TAG"}}',
                          400, "bad_load")
        if label is not None:
            src = dataclasses.replace(src, version=label)
        async with self._lock:
            t0 = time.perf_counter()
            try:
                new = await anyio.to_thread.run_sync(load_ready_model, src, self.svc.settings, self.svc.infer_executor)
            except Exception as e:  # a bundle that fails a check is the caller's to fix; the old version stays
                logger.warning("load of model %s from %s refused: %s", name, src.location, e)
                raise Refused(f"model {name!r} not loaded: {_without_paths(str(e), src, self.svc.settings)}", 400,
                              "bad_bundle") from None
            before = [v for v in self.versions.by_name.get(name, ()) if v != new.version]
            if label is None:  # it replaces every version of the name: none may still get traffic
                try:
                    self.versions.pinned(name, before)
                except Refused:
                    await self._retire_all([new])
                    raise
            self.sources[name] = src
            self.unavailable.pop(name, None)
            logger.info("model %s v%s loaded in %.2f s%s", name, new.version, time.perf_counter() - t0,
                        f" (replaces v{', v'.join(before)})" if before and label is None else "")
            del before
            # No local name keeps an old model: _retire_all holds the last references and frees them.
            await self._retire_all(self._switch(name, new, keep_others=label is not None))
        return new

    def _switch(self, name: str, new: ServedModel, keep_others: bool) -> list[ServedModel]:
        """Serve ``new`` under ``name`` from now on (no await: the next request sees it); returns the
        models it replaces (the same version, or every other version unless ``keep_others``)."""
        olds = [self.versions.add(new)]
        if not keep_others:
            olds += [self.versions.remove(name, v) for v in list(self.versions.by_name[name]) if v != new.version]
        if self.svc.default not in self.svc.models:
            self.svc.default = name
        return [m for m in olds if m is not None]

    async def unload(self, name: str, params: dict) -> None:
        label = _label(params)
        async with self._lock:
            if name not in self.versions.by_name:
                raise Refused(f"model {name!r} is not loaded; loaded: {', '.join(self.versions.by_name) or 'none'}",
                              404, "unknown_model")
            leaving = [self.versions.get(name, label).version] if label is not None else list(self.versions.by_name[name])
            self.versions.pinned(name, leaving)
            if len(leaving) == len(self.versions.by_name[name]):
                self.unavailable[name] = "unloaded"
            logger.info("model %s v%s unloaded", name, ", v".join(leaving))
            await self._retire_all(self._remove(name, leaving))

    def _remove(self, name: str, versions: list[str]) -> list[ServedModel]:
        olds = [self.versions.remove(name, v) for v in versions]
        if self.svc.default not in self.svc.models and self.svc.models:
            self.svc.default = next(iter(self.svc.models))
        return olds

    async def _retire_all(self, olds: list[ServedModel]) -> None:
        """Drain every model in ``olds`` (together), then free them."""
        await asyncio.gather(*(self._retire(m) for m in olds))
        for m in olds:
            m.monitor.retire()
        olds.clear()  # the last references
        gc.collect()  # the frozen-threshold gc (service.tune_gc) would keep cycles around for long
        malloc_trim()

    async def _retire(self, old: ServedModel) -> None:
        """Wait for the requests admitted on ``old`` (live and shadow runs; bounded by the request
        timeout), then stop its batchers."""
        deadline = time.monotonic() + self.svc.settings.timeout_s
        batchers = [old.batcher] + ([old.explainer.batcher] if old.explainer is not None else [])
        while any(b.in_flight for b in batchers) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for b in batchers:
            b.close()


def _label(params: dict) -> str | None:
    """parameters.version: the version label a load serves under, or the one an unload removes."""
    v = params.get("version")
    if v is None:
        return None
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise Refused(f"parameters.version must be a version label matching {NAME_RE.pattern}, got {v!r}", 400,
                      "bad_load")
    return v


def _source(name: str, params: dict) -> ModelSource | None:
    """The load request's bundle: parameters.bundle / parameters.store, or the same keys inside
    parameters.config (the JSON string tritonclient's ``load_model(name, config=...)`` sends)."""
    if any(k.startswith("file:") for k in params):
        raise Refused("model files in the load request are not supported; give a bundle directory on the server "
                      '({"parameters": {"bundle": DIR}}) or a BentoML store tag ({"parameters": {"store": TAG}})',
                      400, "bad_load")
    if "config" in params:
        if not isinstance(params["config"], str):
            raise Refused("parameters.config must be a JSON object string, e.g. '{\"bundle\": \"/path\"}'", 400,
                          "bad_load")
        cfg = jsonbounds.loads(params["config"].encode(), "parameters.config", MAX_VALUES)
        params = cfg if isinstance(cfg, dict) else {}
    bundle, store = params.get("bundle"), params.get("store")
    if bundle is not None and store is not None:
        raise Refused("give either parameters.bundle or parameters.store, not both", 400, "bad_load")
    for key, value in (("bundle", bundle), ("store", store)):
        if value is not None:
            if not isinstance(value, str) or not value:
                raise Refused(f"parameters.{key} must be a non-empty string", 400, "bad_load")
            return ModelSource(name, value, store=key == "store")
    return None


def _under_root(name: str, src: ModelSource | None, root: str | None) -> ModelSource | None:
    """A requested bundle directory, resolved (``..``, symlinks) and checked to lie under the model
    root; a relative one is taken relative to the root. Store tags pass (BentoML checks them)."""
    if src is None or src.store:
        return src
    if root is None:
        raise Refused(f"model {name!r}: loading a bundle directory through the API needs IMGSERVE_MODEL_ROOT on "
                      "the server; a BentoML store tag ({\"parameters\": {\"store\": TAG}}) needs none", 403,
                      "outside_model_root")
    try:
        path = (Path(root) / src.location).resolve()  # an absolute location replaces the root here
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        path = None
    if path is None or not path.is_relative_to(root):
        raise Refused(f"model {name!r}: the bundle must be a directory under the server's model root "
                      "(IMGSERVE_MODEL_ROOT), given relative to it", 403, "outside_model_root")
    return ModelSource(src.name, str(path))


def _without_paths(message: str, src: ModelSource, settings: Any) -> str:
    """A load error as the client may read it: no server path (the bundle and the model root by
    name, any other absolute path, such as a model-store entry's, as ``<path>``)."""
    for path, shown in sorted(((src.location, "<bundle>"), (settings.model_root or "", "<model root>")),
                              key=lambda p: -len(p[0])):
        if path:
            message = message.replace(path, shown)
    return _ABSOLUTE_PATH.sub("<path>", message)


# -- routes --------------------------------------------------------------------------------------
async def body_of(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:
        if TOO_LARGE_KEY not in request.scope:
            raise  # the client went away
        raise Refused(f"request body is over the limit of {request.scope[TOO_LARGE_KEY]} bytes "
                      "(IMGSERVE_MAX_BODY_BYTES)", 413, "body_too_large") from None


async def _json(request: Request) -> dict:
    body = await body_of(request)
    if not body.strip():
        return {}
    doc = jsonbounds.loads(body, "the request body", MAX_VALUES)
    if not isinstance(doc, dict):
        raise Refused("the request body must be a JSON object", 400, "bad_json")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise Refused("'parameters' must be a JSON object", 400, "bad_json")
    return doc


def changes_allowed(svc: Any) -> None:
    """Repository and traffic changes through the API need IMGSERVE_MODEL_CONTROL=explicit (which
    needs an API key and one worker: a change reaches the one process that takes it)."""
    if svc.settings.model_control != "explicit":
        raise Refused("model repository changes are off: start the service with IMGSERVE_MODEL_CONTROL=explicit "
                      "to load and unload models or change the traffic policy through the API", 403, "repository_off")


def _repository(svc: Any, change: bool) -> ModelRepository:
    if change:
        changes_allowed(svc)
    return svc.repository


async def _answer(request: Request, work) -> Response:
    async def run() -> Response:
        return await work(current_service(), await _json(request))

    return await answer(run, f"POST {request.url.path}")


async def index(request: Request) -> Response:
    async def work(svc: Any, doc: dict) -> Response:
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise Refused("'ready' must be true or false", 400, "bad_json")
        return json_response(_repository(svc, change=False).index(ready))

    return await _answer(request, work)


async def load(request: Request) -> Response:
    async def work(svc: Any, doc: dict) -> Response:
        m = await _repository(svc, change=True).load(request.path_params["name"], doc.get("parameters", {}))
        return json_response({"name": m.name, "version": m.version})

    return await _answer(request, work)


async def unload(request: Request) -> Response:
    async def work(svc: Any, doc: dict) -> Response:
        await _repository(svc, change=True).unload(request.path_params["name"], doc.get("parameters", {}))
        return json_response({})

    return await _answer(request, work)


routes = [Route("/v2/repository/index", index, methods=["POST"]),
          Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
          Route("/v2/repository/models/{name}/unload", unload, methods=["POST"])]
