"""Triton's ``ModelStreamInfer`` (service/grpc_stream.py) against a real ``bentoml serve``, through
tritonclient.grpc's own streaming client (``start_stream`` / ``async_stream_infer``) and a raw grpc
stream: answers equal ModelInfer's, in request order with their ids; a bad message in the middle
fails alone with Triton's ``error_message``; the key is required; more messages than the per-stream
in-flight cap all answer; arbitrary bytes as one message of a stream never end the stream.
"""
from __future__ import annotations

import asyncio
import queue
import re
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from hypothesis import HealthCheck, given, settings, strategies as st
from tritonclient.utils import InferenceServerException

from service import grpc_stream
from service.grpc_stream import IN_FLIGHT
from service.oip_grpc_gen import grpc_service_pb2 as pb
from svc_factory import digit_pngs, start_grpc_service, triton_bytes_input

KEY = "grpc-stream-s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def srv(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-grpc-stream")
    s = start_grpc_service({"IMGSERVE_MODELS": str(bundle), "IMGSERVE_API_KEY": KEY, "IMGSERVE_MAX_IMAGES": "16"}, tmp)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv) -> tg.InferenceServerClient:
    c = tg.InferenceServerClient(srv.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    return digit_pngs(6)


def _pixels(seed: int, n: int = 2):
    px = np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    inp = tg.InferInput("image", list(px.shape), "UINT8")
    inp.set_data_from_numpy(px)
    return inp


def _streamed(client, requests: list[dict], headers=AUTH) -> list[tuple]:
    """Send ``requests`` (async_stream_infer keyword arguments) on one stream; (result, error) per answer."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)), headers=headers)
    try:
        for kw in requests:
            client.async_stream_infer(**kw)
        got = [answers.get(timeout=30) for _ in requests]
    finally:
        client.stop_stream(cancel_requests=True)
    return got


def _grpc_calls(srv) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics").text
    rx = r'^imgserve_grpc_requests_total\{code="(\w+)",method="ModelStreamInfer"\} (\S+)$'
    return {code: float(n) for code, n in re.findall(rx, text, re.M)}


def test_stream_answers_equal_model_infer_in_order(client, files):
    """Pixels and encoded files on one stream: each answer equals ModelInfer's, ids in request order."""
    reqs = [dict(model_name="digits", inputs=[_pixels(i)], request_id=f"px{i}",
                 outputs=[tg.InferRequestedOutput("logits")]) for i in range(4)]
    reqs += [dict(model_name="digits", inputs=[triton_bytes_input(files[i:i + 2])], request_id=f"png{i}",
                  outputs=[tg.InferRequestedOutput("probabilities", class_count=3)]) for i in range(3)]
    got = _streamed(client, reqs)
    assert [e for _, e in got] == [None] * len(reqs)
    assert [r.get_response().id for r, _ in got] == [kw["request_id"] for kw in reqs]
    for (result, _), kw in zip(got, reqs):
        want = client.infer(kw["model_name"], kw["inputs"], outputs=kw["outputs"], headers=AUTH)
        name = kw["outputs"][0].name()
        if want.as_numpy(name).dtype == np.object_:  # classification rows: "score:index:label"
            assert result.as_numpy(name).tolist() == want.as_numpy(name).tolist()
        else:
            np.testing.assert_allclose(result.as_numpy(name), want.as_numpy(name), atol=1e-6)


def test_a_bad_message_fails_alone(client, srv, files):
    """A bad shape, a bad image and an unknown model in the middle: each answered with its error
    (Triton's error_message), the others answer, the stream goes on; counted per message."""
    bad_shape = tg.InferInput("image", [1, 4, 4, 1], "UINT8")
    bad_shape.set_data_from_numpy(np.zeros((1, 4, 4, 1), np.uint8))
    good = lambda i: dict(model_name="digits", inputs=[_pixels(10 + i)], request_id=f"ok{i}")  # noqa: E731
    reqs = [good(0), dict(model_name="digits", inputs=[bad_shape], request_id="shape"), good(1),
            dict(model_name="digits", inputs=[triton_bytes_input([b"not an image"])], request_id="junk"),
            dict(model_name="nope", inputs=[_pixels(0)], request_id="model"), good(2)]
    before = _grpc_calls(srv)
    got = _streamed(client, reqs)
    after = _grpc_calls(srv)
    assert [r.get_response().id for r, e in got if e is None] == ["ok0", "ok1", "ok2"]
    errors = [str(e) for r, e in got if e is not None]
    assert len(errors) == 3 and "shape" in errors[0] and "nope" in errors[2], errors
    assert after.get("OK", 0) - before.get("OK", 0) == 3
    assert after.get("INVALID_ARGUMENT", 0) - before.get("INVALID_ARGUMENT", 0) == 2
    assert after.get("NOT_FOUND", 0) - before.get("NOT_FOUND", 0) == 1


def test_key_required(client):
    """A stream without the right key ends with UNAUTHENTICATED, before any message is answered."""
    for headers in ({}, {"authorization": "Bearer wrong"}):
        answers: queue.Queue = queue.Queue()
        client.start_stream(lambda result, error: answers.put((result, error)), headers=headers)
        try:
            client.async_stream_infer("digits", [_pixels(0)])
        except InferenceServerException:
            pass  # the server's refusal came first: the client already knows the stream is over
        result, error = answers.get(timeout=30)
        client.stop_stream(cancel_requests=True)
        assert result is None and isinstance(error, InferenceServerException)
        assert error.status() == "StatusCode.UNAUTHENTICATED", error


def _raw_stream(srv, messages: list[bytes]) -> list:
    with grpc.insecure_channel(srv.grpc_url) as ch:
        call = ch.stream_stream(STREAM)
        return [pb.ModelStreamInferResponse.FromString(r)
                for r in call(iter(messages), timeout=60, metadata=tuple(AUTH.items()))]


def _message(i: int) -> bytes:
    px = np.full((1, 8, 8, 1), i % 256, np.uint8)
    return pb.ModelInferRequest(model_name="digits", id=str(i), raw_input_contents=[px.tobytes()], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 8, 8, 1])]).SerializeToString()


def test_more_messages_than_in_flight_cap(srv):
    """Past IN_FLIGHT the server stops reading until answers are written: every message still answers,
    in order, and the stream ends when the client half-closes."""
    n = 3 * IN_FLIGHT + 5
    answers = _raw_stream(srv, [_message(i) for i in range(n)])
    assert [a.infer_response.id for a in answers] == [str(i) for i in range(n)]
    assert not any(a.error_message for a in answers)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_fuzz_one_message_of_a_stream(srv, raw):
    """Arbitrary bytes between two good messages: answered (an error_message or an answer) alone,
    and the good ones around it answer."""
    first, middle, last = _raw_stream(srv, [_message(1), raw, _message(2)])
    assert (first.infer_response.id, last.infer_response.id) == ("1", "2")
    assert not first.error_message and not last.error_message
    assert middle.error_message or middle.infer_response.outputs


def test_cancelled_stream_frees_its_messages(srv):
    """The client goes away mid-stream: the stream is counted CANCELLED and the server serves on."""
    before = _grpc_calls(srv)
    with grpc.insecure_channel(srv.grpc_url) as ch:
        call = ch.stream_stream(STREAM)(iter([_message(i) for i in range(4 * IN_FLIGHT)]),
                                        metadata=tuple(AUTH.items()))
        next(call)
        call.cancel()
    for _ in range(50):
        if _grpc_calls(srv).get("CANCELLED", 0) > before.get("CANCELLED", 0):
            break
        time.sleep(0.1)
    assert _grpc_calls(srv).get("CANCELLED", 0) == before.get("CANCELLED", 0) + 1
    assert [a.infer_response.id for a in _raw_stream(srv, [_message(7)])] == ["7"]


def test_a_client_that_does_not_read_holds_at_most_in_flight_messages():
    """In-process, on serve() itself: answers that cannot be written (a client that sends but never
    reads) stop the reading at IN_FLIGHT + 1 messages; cancelling the stream cancels them all."""
    read, started = [], []

    async def requests():
        for i in range(10 * IN_FLIGHT):
            read.append(i)
            yield b"m"

    async def answer(raw: bytes):
        started.append(raw)
        await asyncio.sleep(3600)  # never done before the stream is cancelled

    async def main():
        task = asyncio.ensure_future(grpc_stream.serve(requests(), asyncio.sleep, answer))
        for _ in range(100):
            await asyncio.sleep(0)
        assert len(read) == len(started) == IN_FLIGHT + 1, (len(read), len(started))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(5):
            await asyncio.sleep(0)
        assert all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    asyncio.run(main())


def test_load_harness_streams(srv):
    """loadtests.grpc_load's streaming mode (h2load, one stream of N messages per request): no errors,
    and every message it counts as answered the server counted OK too."""
    from loadtests import grpc_load

    before = _grpc_calls(srv)
    (r,) = grpc_load.measure(srv, srv.grpc_url, _message(3), [2], 2, headers=AUTH, stream_messages=4)
    assert r.errors == 0 and r.ok >= 4, r
    assert _grpc_calls(srv).get("OK", 0) - before.get("OK", 0) >= r.ok
