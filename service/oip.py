"""Open Inference Protocol v2 REST routes (KServe's "V2 protocol", Triton's HTTP API) on the served models.

Mounted by ``service.service`` next to /models. Same models, batcher, admission control, limits,
decoding, API key (the guard middleware) and error bodies as /classify; only the wire format
differs (``service.oip_tensors``). docs/protocol.md has the user's view.

One input, named as the bundle's input (``image``), in either datatype:
- ``BYTES`` ``[N]`` or ``[N, 1]``: encoded image files, decoded and preprocessed as /classify does;
- ``UINT8`` ``[N, H, W, C]``: pixels already preprocessed to the bundle's input.
Outputs ``logits`` and ``probabilities`` (FP32 ``[N, num_classes]``); either one with Triton's
``classification`` parameter becomes BYTES ``[N, k]`` "value:index:label", highest first.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imgformat.preprocess import ImageError, stack
from service.answer import answer, current_service
from service.errors import Refused
from service.io import TOO_LARGE_KEY, Upload, header, json_response
from service.models import ServedModel, softmax
from service.oip_tensors import (HEADER_LENGTH, InferRequest, InputTensor, OutputTensor, RequestedOutput,
                                 encode_response, parse_request)

SERVER_NAME = "imgserve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
_HEADER_LENGTH_KEY = HEADER_LENGTH.encode()  # as ASGI scope headers hold it
STRUCTURE_VALUES = 1024  # JSON values of a request besides its pixels: names, shapes, outputs, parameters
INLINE_PARSE_BYTES = 256 * 1024  # bodies up to this size are parsed on the event loop: cheaper than a thread hand-off
_PLATFORMS = {"onnx": "onnx_onnxv1", "torchscript": "pytorch_torchscript"}  # OIP's platform names


# -- outputs: name -> (logits (N, C) float32) -> values that classification ranks --------------
def _logits(logits: np.ndarray) -> np.ndarray:
    return logits


def _probabilities(logits: np.ndarray) -> np.ndarray:
    return softmax(logits)


OUTPUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"logits": _logits, "probabilities": _probabilities}
# The class-activation map of each image's top-1 class (docs/explain.md): sent only when asked for
# by name, from models that explain; it runs the graph with the features output.
HEATMAP = "heatmap"


# -- health and metadata -------------------------------------------------------------------------
async def server_metadata(request: Request) -> Response:
    return json_response({"name": SERVER_NAME, "version": _version(), "extensions": EXTENSIONS})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imgserve")
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "unknown"


async def live(request: Request) -> Response:
    return json_response({"live": True})


async def ready(request: Request) -> Response:
    try:
        svc = current_service()
    except Refused:
        svc = None
    ok = svc is not None and svc.__is_ready__() and bool(svc.models)
    return json_response({"ready": ok}, 200 if ok else 503)


async def model_ready(request: Request) -> Response:
    return await _about_model(request, lambda m: {"name": m.name, "ready": True})


async def model_metadata(request: Request) -> Response:
    return await _about_model(request, metadata)


def metadata(m: ServedModel) -> dict[str, Any]:
    c = len(m.class_names)
    return {"name": m.name, "versions": _versions(m), "platform": _PLATFORMS.get(m.backend.name, m.backend.name),
            "inputs": [{"name": _input_name(m), "datatype": "UINT8", "shape": [-1, *m.preprocessor.shape]}],
            "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, c]} for n in OUTPUTS]
            + ([{"name": HEATMAP, "datatype": "FP32", "shape": [-1, *m.preprocessor.shape[:2]]}]
               if m.explainer is not None else [])}


async def model_config(request: Request) -> Response:
    return await _about_model(request, config)


def config(m: ServedModel) -> dict[str, Any]:
    """Triton's model configuration (GET .../config, tritonclient's ``get_model_config``): the batch
    dimension is implicit, ``max_batch_size`` is the batcher's."""
    backend = {"onnx": ("onnxruntime_onnx", "onnxruntime"), "torchscript": ("pytorch_libtorch", "pytorch")}
    platform, name = backend.get(m.backend.name, (m.backend.name, m.backend.name))
    c = len(m.class_names)
    return {"name": m.name, "platform": platform, "backend": name, "max_batch_size": m.batcher.max_batch_size,
            "version_policy": {"specific": {"versions": _versions(m)}},
            "input": [{"name": _input_name(m), "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC",
                       "dims": list(m.preprocessor.shape)}],
            "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [c]} for n in OUTPUTS]}


def _versions(m: ServedModel) -> list[str]:
    """Every served version of ``m``'s name (Triton's metadata lists them all)."""
    return list(current_service().versions.by_name.get(m.name, {m.version: m}))


def _input_name(m: ServedModel) -> str:
    return m.bundle.manifest["input"].get("name", "image")


# -- inference -----------------------------------------------------------------------------------
async def infer(request: Request) -> Response:
    """The router's route for .../infer, there so other methods get 405 and route listings show it.
    Never called: the lean route (service/route.py) answers every POST to this path first."""
    raise RuntimeError("POST .../infer reached the router: the lean route is not installed")


async def answer_infer(scope: dict, body: bytes | None, name: str, version: str | None = None) -> Response:
    """POST .../infer: ``body`` is None when the guard cut off a chunked body over the size limit."""
    async def run() -> Response:
        svc = current_service()
        if body is None:
            raise Refused(f"request body is over the limit of {scope[TOO_LARGE_KEY]} bytes "
                          "(IMGSERVE_MAX_BODY_BYTES)", 413, "body_too_large")
        req = await _parse(svc, _resolve(svc, name, version), body, header(scope, _HEADER_LENGTH_KEY))
        # The version is chosen after the parse's await: no await between this and admission, so a
        # version switch never lands between the two and this request runs wholly on one version.
        choice = svc.versions.choose(name, version)
        model = choice.live
        tensor, n = _one_input(model, req, svc.settings.max_images)
        outputs = _requested(model, req)
        explainer = model.explainer if any(o.name == HEATMAP for o in outputs) else None
        batcher = explainer.batcher if explainer is not None else model.batcher
        heat = None
        with batcher.admitted(n):
            pixels = await _pixels(svc, model, tensor)  # (N, H, W, C) uint8
            if explainer is None:
                logits = await model.batcher.infer(pixels)  # (N, num_classes) float32
            else:
                logits, _, heat = await explainer.maps(pixels, [None] * len(pixels))
        if explainer is None:
            svc.shadows.start(model, choice.shadow, pixels, logits)  # in the background; never awaited here
        model.monitor.observe(pixels, logits)
        head = {"model_name": model.name, "model_version": model.version}
        if req.id is not None:
            head["id"] = req.id
        out, headers = encode_response(head, [_heatmap(o, heat) if o.name == HEATMAP else _output(model, o, logits)
                                              for o in outputs])
        return Response(out, headers={**headers, "X-Model-Version": model.version})

    return await answer(run, "POST /v2/models/{name}/infer")


async def _parse(svc: Any, model: ServedModel, body: bytes, header_length: str | None) -> InferRequest:
    """The request, parsed within the model's bounds; a big body in a decoder thread, so the event
    loop (health probes, other requests) never waits for JSON parsing."""
    parse = functools.partial(parse_request, body, header_length, raw_input=_input_name(model),
                              max_values=_most_values(svc, model))
    if len(body) <= INLINE_PARSE_BYTES:
        return parse()
    return await anyio.to_thread.run_sync(parse, limiter=svc.decode_limiter)


def _most_values(svc: Any, model: ServedModel) -> int:
    return svc.settings.max_images * math.prod(model.preprocessor.shape) + STRUCTURE_VALUES


def infer_values_budget(scope: dict, name: str, version: str | None = None) -> int | None:
    """The most JSON values a plain-JSON infer body for this model may hold, for the lean route to
    count while the body arrives; None (no early count) for a binary body or an unknown model."""
    if header(scope, _HEADER_LENGTH_KEY) is not None:
        return None
    try:
        svc = current_service()
        return _most_values(svc, _resolve(svc, name, version))
    except Refused:
        return None


def _one_input(model: ServedModel, req: InferRequest, max_images: int) -> tuple[InputTensor, int]:
    """The request's image tensor, checked against the model: (tensor, images in it)."""
    want = _input_name(model)
    if req.inputs[0].name != want or len(req.inputs) != 1:
        got = ", ".join(repr(t.name) for t in req.inputs)
        raise Refused(f"model {model.name!r} takes one input named {want!r}, got {got}", 400, "bad_input")
    t = req.inputs[0]
    if t.datatype == "BYTES":
        if len(t.shape) > 2 or (len(t.shape) == 2 and t.shape[1] != 1):
            raise Refused(f"input {want!r}: BYTES shape must be [N] or [N, 1] (one encoded file per image), "
                          f"got {list(t.shape)}", 400, "bad_shape")
    elif tuple(t.shape[1:]) != model.preprocessor.shape or len(t.shape) != 4:
        raise Refused(f"input {want!r}: UINT8 shape must be [N, {', '.join(map(str, model.preprocessor.shape))}] "
                      f"(N, H, W, C) for model {model.name!r}, got {list(t.shape)}", 400, "bad_shape")
    n = t.shape[0]
    if n < 1:
        raise Refused(f"input {want!r} holds no image (shape {list(t.shape)})", 400, "bad_shape")
    if n > max_images:
        raise Refused(f"{n} images in one request; at most {max_images} (IMGSERVE_MAX_IMAGES)", 413, "too_many_files")
    return t, n


def _requested(model: ServedModel, req: InferRequest) -> list[RequestedOutput]:
    outs = req.outputs if req.outputs is not None else [RequestedOutput(n, None) for n in OUTPUTS]
    c = len(model.class_names)
    for o in outs:
        if o.name == HEATMAP:
            if model.explainer is None:
                raise Refused(f"model {model.name!r} has no output 'heatmap': it has no explanations: "
                              f"{model.no_explain}", 400, "no_explanations")
            if o.classification:
                raise Refused("output 'heatmap' is a map, not scores: classification does not apply", 400,
                              "bad_classification")
        elif o.name not in OUTPUTS:
            names = [*OUTPUTS, HEATMAP] if model.explainer is not None else list(OUTPUTS)
            raise Refused(f"model {model.name!r} has no output {o.name!r}; outputs: {', '.join(names)}", 400,
                          "bad_output")
        if o.classification > c:
            raise Refused(f"output {o.name!r}: classification {o.classification} is over the model's {c} classes", 400,
                          "bad_classification")
        if o.binary is None:
            o.binary = req.binary_output
    return outs


async def _pixels(svc: Any, model: ServedModel, t: InputTensor) -> np.ndarray:
    if t.datatype != "BYTES":
        return np.ascontiguousarray(t.data)
    arrays = []
    for i, data in enumerate(t.data):
        try:
            arrays.append(await svc._decode(model, Upload(f"element {i}", None, data)))
        except ImageError as e:
            raise Refused(f"input {t.name!r} element {i}: {e}", e.status, e.kind) from None
    return stack(arrays)


def _output(model: ServedModel, o: RequestedOutput, logits: np.ndarray) -> OutputTensor:
    values = OUTPUTS[o.name](logits)  # (N, C)
    if not o.classification:
        return OutputTensor(o.name, "FP32", values.shape, values.astype(np.float32, copy=False), o.binary)
    k = o.classification
    idx = np.argsort(-values, axis=1, kind="stable")[:, :k]
    names = model.class_names
    rows = []
    for vrow, irow in zip(values, idx.tolist()):
        # Python floats (no numpy scalar per element); repr of the float64 value: the score of
        # "probabilities" is bit-for-bit /classify's score.
        rows += [f"{s!r}:{i}:{names[i]}".encode() for s, i in zip(vrow[irow].tolist(), irow)]
    return OutputTensor(o.name, "BYTES", (len(values), k), rows, o.binary)


def _heatmap(o: RequestedOutput, heat: np.ndarray) -> OutputTensor:
    """(N, H, W) maps of each image's top-1 class, values in [0, 1]."""
    return OutputTensor(o.name, "FP32", heat.shape, heat.astype(np.float32), o.binary)


# -- plumbing ------------------------------------------------------------------------------------
def _resolve(svc: Any, name: str, version: str | None = None) -> ServedModel:
    """The version the path names, else the name's default version; 404 listing what is served otherwise."""
    return svc.versions.get(name, version)


async def _about_model(request: Request, describe: Callable[[ServedModel], dict[str, Any]]) -> Response:
    """GET on a model's path: ``describe`` of the model (and version) it names."""
    async def work() -> Response:
        return json_response(describe(_resolve(current_service(), **request.path_params)))

    return await answer(work, f"GET {request.url.path}")


# The POST .../infer paths, for the lean route: Starlette's ``{name}`` matches one path segment.
INFER_PATH = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer"


def _model_routes(prefix: str) -> list[Route]:
    return [Route(prefix, model_metadata, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/config", model_config, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"])]


routes = [Route("/v2", server_metadata, methods=["GET"]),
          Route("/v2/health/live", live, methods=["GET"]),
          Route("/v2/health/ready", ready, methods=["GET"]),
          *_model_routes("/v2/models/{name}"),
          *_model_routes("/v2/models/{name}/versions/{version}")]
