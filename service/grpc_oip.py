"""Open Inference Protocol v2 over gRPC (KServe's ``GRPCInferenceService``, Triton's gRPC API).

Runs inside the BentoML worker's event loop (``grpc.aio``, started by ``ImgServe.start_grpc``), so
requests reach the same models, batcher, admission control and decoders as REST; nothing is loaded
twice. The message classes are generated from Triton's ``grpc_service.proto`` by grpcio-tools into
``service.oip_grpc_gen`` (scripts/oip_grpc_gen.py); Triton's config and repository extensions are in
``service.grpc_repository``.
The wire logic is ``service.oip``'s; only the message shapes differ. docs/protocol.md has the
user's view.

Rules as on REST: the API key (``authorization: Bearer KEY`` metadata) guards inference; health and
metadata stay open; message sizes are capped by IMGSERVE_MAX_BODY_BYTES; a bad message fails alone.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from service import access, grpc_metrics, grpc_repository, grpc_stream, metrics, oip
from service.batching import Overloaded
from service.errors import Refused
from service.oip_grpc_gen import grpc_service_pb2 as pb
from service.oip_grpc_gen import grpc_service_pb2_grpc as pb_grpc
from service.oip_tensors import (DEFAULT_MAX_VALUES, InferRequest, InputTensor, OutputTensor, RequestedOutput, _check_count,
                                 _from_binary, bad, join_bytes)

logger = logging.getLogger(__name__)

# HTTP status of a Refused -> gRPC status code (as Triton maps its errors).
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
SERVICE_NAME = "inference.GRPCInferenceService"


def _metadata(context: Any) -> Iterator[tuple[bytes, bytes]]:
    """The call's metadata as header pairs, read only when a traffic policy's sticky key asks for it
    (gRPC metadata keys are lower-case, as HTTP/2 header names are)."""
    for k, v in context.invocation_metadata() or ():
        yield k.encode("latin-1"), v if isinstance(v, bytes) else v.encode("latin-1")


class Abort(Exception):
    """A gRPC error answer: code, message and trailing metadata (a retry hint)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple = ()) -> None:
        super().__init__(message)
        self.code, self.trailers = code, trailers


def _refused(e: Refused) -> Abort:
    metrics.ERRORS.labels(kind=e.kind).inc()
    return Abort(_CODES.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), str(e))


def _overloaded(e: Overloaded) -> Abort:
    # The retry hint as trailing metadata, twice: ``retry-after`` (seconds, REST's header) for clients
    # that read it, and ``grpc-retry-pushback-ms``, which a gRPC channel with a retry policy obeys by
    # itself (gRFC A6). Triton sends neither; a client that ignores both still gets RESOURCE_EXHAUSTED.
    return Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e} (retry after {e.retry_after} s)",
                 (("retry-after", str(e.retry_after)), ("grpc-retry-pushback-ms", str(e.retry_after * 1000))))


# Exception -> its gRPC answer; anything else is a bug, answered by grpc as UNKNOWN (INTERNAL in a stream).
_ANSWERS: dict[type, Callable[[Any], Abort]] = {Refused: _refused, Overloaded: _overloaded, Abort: lambda e: e}


def abort_of(e: BaseException) -> Abort | None:
    """The gRPC error answer to a refusal (Refused, Overloaded, Abort); None for anything else."""
    for kind, answer in _ANSWERS.items():
        if isinstance(e, kind):
            return answer(e)
    return None


# -- request messages -> service.oip_tensors types ----------------------------------------------
def _param(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _input(t: Any, raw: bytes | None, max_values: int) -> InputTensor:
    shape = tuple(t.shape)
    if not shape or any(d < 0 for d in shape):
        raise bad(f"input '{t.name}': 'shape' must be a list of non-negative integers, got {list(shape)}")
    if raw is not None:
        return InputTensor(t.name, t.datatype, shape, _from_binary(t.name, t.datatype, shape, memoryview(raw), max_values))
    if t.datatype == "BYTES":
        return InputTensor(t.name, t.datatype, shape, _check_count(t.name, shape, list(t.contents.bytes_contents)))
    if t.datatype != "UINT8":
        raise bad(f"input '{t.name}': datatype {t.datatype!r} is not accepted; send UINT8 [N, H, W, C] "
                  "preprocessed pixels or BYTES [N] encoded image files", "bad_dtype")
    values = np.asarray(t.contents.uint_contents, dtype=np.int64)
    if values.size and values.max() > 255:
        raise bad(f"input '{t.name}': UINT8 values must be in 0..255", "bad_dtype")
    n = int(np.prod(shape, dtype=object))
    if values.size != n:
        raise bad(f"input '{t.name}': shape {list(shape)} needs {n} values, got {values.size}", "bad_shape")
    return InputTensor(t.name, t.datatype, shape, values.astype(np.uint8).reshape(shape))


def parse(msg: Any, max_values: int = DEFAULT_MAX_VALUES) -> InferRequest:
    """A ``ModelInferRequest`` -> InferRequest; Refused (INVALID_ARGUMENT) on any mistake."""
    if not msg.inputs:
        raise bad("the inference request needs at least one input")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise bad(f"{len(raw)} raw_input_contents for {len(msg.inputs)} inputs: give one per input or none",
                  "bad_binary")
    inputs = [_input(t, raw[i] if raw else None, max_values) for i, t in enumerate(msg.inputs)]
    outputs, seen = [], set()
    for o in msg.outputs:
        if o.name in seen:
            raise bad(f"output '{o.name}' is requested twice")
        seen.add(o.name)
        k = _param(o.parameters["classification"]) if "classification" in o.parameters else 0
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise bad(f"output '{o.name}': 'classification' must be a positive integer (top-k), got {k!r}",
                      "bad_classification")
        outputs.append(RequestedOutput(o.name, True, k))
    return InferRequest(msg.id or None, inputs, outputs or None, True)


def _response(model: Any, rid: str, outputs: list[OutputTensor]) -> Any:
    out = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=rid)
    for o in outputs:
        out.outputs.add(name=o.name, datatype=o.datatype, shape=list(o.shape))
        out.raw_output_contents.append(join_bytes(o.data) if o.datatype == "BYTES"
                                       else np.ascontiguousarray(o.data, "<f4").tobytes())
    return out


# -- the servicer --------------------------------------------------------------------------------
class InferenceServicer(grpc_repository.RepositoryMethods, pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 / Triton gRPC methods on the running ``ImgServe`` instance ``svc``."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc

    async def _call(self, context: Any, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
            return await result if hasattr(result, "__await__") else result
        except (Refused, Overloaded, Abort) as e:
            err = abort_of(e)
        if err.trailers:
            context.set_trailing_metadata(err.trailers)
        await context.abort(err.code, str(err))

    def authorized(self, context: Any) -> bool:
        key = self.svc.settings.api_key
        if key is None:  # open server: the metadata tuple is not even built
            return True
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        return access.bearer_matches(got.encode(), key)

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.svc.__is_ready__() and bool(self.svc.models))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=oip._version(), extensions=oip.EXTENSIONS)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        # An unknown model is "not ready", not an error: what Triton answers and clients poll for.
        try:
            oip._resolve(self.svc, request.name, request.version or None)
        except Refused:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            doc = oip.metadata(oip._resolve(self.svc, request.name, request.version or None))
            tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]  # noqa: E731
            return pb.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"],
                                            inputs=tensors(doc["inputs"]), outputs=tensors(doc["outputs"]))
        return await self._call(context, answer)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._call(context, lambda: self._infer(request, context))

    async def _infer(self, msg: Any, context: Any) -> Any:
        svc = self.svc
        # No await between choosing the version and admission, as on REST (the traffic policy's
        # weights apply when the request names no model_version).
        choice = svc.versions.choose(msg.model_name, msg.model_version or None, _metadata(context))
        model = choice.live
        req = parse(msg, oip._most_values(svc, model))
        tensor, n = oip._one_input(model, req, svc.settings.max_images)
        outputs = oip._requested(model, req)
        with model.batcher.admitted(n):
            pixels = await oip._pixels(svc, model, tensor)
            logits = await model.batcher.infer(pixels)
        svc.shadows.start(model, choice.shadow, pixels, logits)
        model.monitor.observe(pixels, logits)
        return _response(model, msg.id, [oip._output(model, o, logits) for o in outputs])


# The unary methods served, each with its request message. They are registered with a bytes-in
# handler (``_decoding``) instead of the generated registration: a message that does not decode
# answers INVALID_ARGUMENT here, where grpc's own deserializer would answer UNKNOWN. The stream
# ``ModelStreamInfer`` is service.grpc_stream's. Triton's other methods (statistics, shared memory,
# trace, log settings) answer UNIMPLEMENTED.
METHODS = {"ServerLive": pb.ServerLiveRequest, "ServerReady": pb.ServerReadyRequest,
           "ServerMetadata": pb.ServerMetadataRequest, "ModelReady": pb.ModelReadyRequest,
           "ModelMetadata": pb.ModelMetadataRequest, "ModelInfer": pb.ModelInferRequest,
           **grpc_repository.METHODS}


# Answered without the API key, as REST's service/access.py opens only the health probes (and the
# standard health service, registered apart).
PUBLIC = frozenset({"ServerLive", "ServerReady"})


def _decoding(servicer: InferenceServicer, name: str, message: Any) -> Callable[[bytes, Any], Any]:
    method = getattr(servicer, name)

    async def handle(raw: bytes, context: Any) -> Any:
        t0, error = time.perf_counter(), None
        try:
            return await _checked(raw, context)
        except BaseException as e:  # context.abort's exception included: it carries the status
            error = e
            raise
        finally:
            grpc_metrics.record(name, context, error, t0)

    async def _checked(raw: bytes, context: Any) -> Any:
        if name not in PUBLIC and not servicer.authorized(context):
            metrics.ERRORS.labels(kind="unauthorized").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata 'authorization: Bearer <IMGSERVE_API_KEY>'")
        try:
            request = message.FromString(raw)
        except DecodeError as e:
            metrics.ERRORS.labels(kind="bad_message").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {message.DESCRIPTOR.name}: {e}")
        return await method(request, context)
    return handle


def handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    unary = {name: grpc.unary_unary_rpc_method_handler(_decoding(servicer, name, message),
                                                       response_serializer=lambda m: m.SerializeToString())
             for name, message in METHODS.items()}
    stream = grpc_stream.handler(servicer.authorized, servicer._infer, abort_of)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {**unary, grpc_stream.METHOD: stream})


def options(max_bytes: int) -> list[tuple[str, int]]:
    """Message size caps, set explicitly (gRPC's default receive cap is 4 MiB, send unlimited)."""
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


async def start(svc: Any, host: str, port: int) -> Any:
    """Start the gRPC server on the running event loop; returns it (``await server.stop(grace)``)."""
    server = grpc.aio.server(options=options(svc.settings.max_body_bytes))
    # Not the generated add_..._to_server: its registered handlers decode before we can answer
    # INVALID_ARGUMENT. Methods not in METHODS answer UNIMPLEMENTED.
    server.add_generic_rpc_handlers((handlers(InferenceServicer(svc)),))
    checker = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    # Last: every method nobody above serves, answered UNIMPLEMENTED and counted under one label.
    server.add_generic_rpc_handlers((grpc_metrics.Unimplemented(),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"gRPC: cannot bind {host}:{port}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", SERVICE_NAME):
        result = checker.set(name, serving)
        if hasattr(result, "__await__"):
            await result
    logger.info("imgserve gRPC (OIP v2) on %s:%d", host, port)
    return server
