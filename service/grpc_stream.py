"""Triton's ``ModelStreamInfer``: a bidirectional stream of ``ModelInferRequest`` in and
``ModelStreamInferResponse`` out (tritonclient's ``start_stream`` / ``async_stream_infer``,
perf_analyzer ``--streaming``, Triton's C++ and Go clients).

Each message takes ``ModelInfer``'s path (``service.grpc_oip.InferenceServicer._infer``: same
models, batcher, admission control, limits and metrics) and several run at once: the stream keeps
reading while earlier messages are in the batcher, up to ``IN_FLIGHT`` per stream. Past that it
stops reading, so HTTP/2 flow control holds the client back and a stream cannot make the process
grow; a client that does not read its answers stops its own stream the same way (writes wait).

Answers go out in the order the requests came in, as Triton does for models that are not
decoupled, each with its request's ``id``. A message that fails (does not decode, bad input, shed
by admission control) is answered alone with ``error_message`` and its ``id``, Triton's
convention, and the stream goes on. The API key is checked once, from the call's metadata, before
any message is read: a wrong key ends the stream with UNAUTHENTICATED.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from service import grpc_metrics, metrics
from service.oip_grpc_gen import grpc_service_pb2 as pb

logger = logging.getLogger(__name__)
METHOD = "ModelStreamInfer"
# Messages of one stream being answered at once: enough to keep the batcher fed from one
# connection (a batch is at most 32 images by default), small enough that a stream holds at most
# IN_FLIGHT messages of at most IMGSERVE_MAX_BODY_BYTES each.
IN_FLIGHT = 32


def failed(message: str, rid: str = "") -> Any:
    """The answer to one message that failed: Triton's ``error_message``, with the request's id."""
    return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(id=rid))


async def answer_one(raw: bytes, infer: Callable[[Any], Awaitable[Any]],
                     error_of: Callable[[Exception], Any]) -> Any:
    """One message of the stream -> its ``ModelStreamInferResponse``; never raises (but cancellation).
    ``infer`` is ModelInfer's path, ``error_of`` maps its refusals to ``grpc_oip.Abort``."""
    t0, rid = time.perf_counter(), ""
    try:
        msg = pb.ModelInferRequest.FromString(raw)
        rid = msg.id
        response = pb.ModelStreamInferResponse(infer_response=await infer(msg))
        code = "OK"
    except DecodeError as e:
        metrics.ERRORS.labels(kind="bad_message").inc()
        response, code = failed(f"not a valid ModelInferRequest: {e}", rid), "INVALID_ARGUMENT"
    except Exception as e:  # noqa: BLE001 - one message's failure must not end the others
        err = error_of(e)
        if err is None:
            logger.exception("ModelStreamInfer: message %r failed", rid)
            response, code = failed("internal error", rid), "INTERNAL"
        else:
            response, code = failed(str(err), rid), err.code.name
    grpc_metrics.count(METHOD, code, t0)
    return response


async def serve(requests: AsyncIterator[bytes], write: Callable[[Any], Awaitable[None]],
                answer: Callable[[bytes], Awaitable[Any]]) -> None:
    """Read ``requests`` while earlier ones are answered (at most IN_FLIGHT queued or running),
    ``write`` the answers in request order; return when the client has half-closed and every answer
    is written. Cancelled (the client went away): every message still running is cancelled too."""
    # IN_FLIGHT - 1 waiting in the queue, one more being written (Queue(0) would be unbounded).
    pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue(IN_FLIGHT - 1)
    running: set[asyncio.Future] = set()

    async def read() -> None:
        try:
            async for raw in requests:
                task = asyncio.ensure_future(answer(raw))
                running.add(task)
                task.add_done_callback(running.discard)
                await pending.put(task)  # waits while IN_FLIGHT answers are pending: no more reading
        except Exception:
            await pending.put(None)  # the writer stops after the answers before it, then raises this
            raise
        await pending.put(None)  # not when cancelled: then nobody drains the queue

    reader = asyncio.ensure_future(read())
    try:
        while (task := await pending.get()) is not None:
            await write(await task)
        await reader  # a failed read (not a half-close) ends the stream with its error
    finally:
        for t in (reader, *running):
            t.cancel()


def handler(authorized: Callable[[Any], bool], infer: Callable[[Any, Any], Awaitable[Any]],
            error_of: Callable[[Exception], Any]) -> grpc.RpcMethodHandler:
    """The stream-stream method handler: bytes in (each message decoded in ``answer_one``, so one that
    does not decode fails alone), ``ModelStreamInferResponse`` out."""
    async def stream(requests: AsyncIterator[bytes], context: Any) -> None:
        t0, error = time.perf_counter(), None
        try:
            if not authorized(context):
                metrics.ERRORS.labels(kind="unauthorized").inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or wrong API key: send metadata 'authorization: Bearer <IMGSERVE_API_KEY>'")
            await serve(requests, context.write,
                        lambda raw: answer_one(raw, lambda msg: infer(msg, context), error_of))
        except BaseException as e:
            error = e
            raise
        finally:
            if error is not None:  # a stream that ends well is counted by its messages alone
                grpc_metrics.record(METHOD, context, error, t0)

    return grpc.stream_stream_rpc_method_handler(stream, response_serializer=lambda m: m.SerializeToString())
