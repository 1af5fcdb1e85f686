"""Hypothesis against the gRPC side of the Open Inference Protocol (service/grpc_oip.py), in-process:
any ModelInferRequest (structured, or any bytes that decode as one) either parses or is refused with a
4xx ``Refused`` (INVALID_ARGUMENT on the wire): never another exception, never a slow parse. The wire
test with a real server is tests/service/test_grpc.py::test_fuzz_model_infer_bytes. Each message of a
``ModelStreamInfer`` stream goes through the same ``FromString`` and ``parse`` (service/grpc_stream.py);
its wire test is tests/service/test_grpc_stream.py::test_fuzz_one_message_of_a_stream."""
from __future__ import annotations

import time

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import Refused
from service.grpc_oip import parse
from service.oip_grpc_gen import grpc_service_pb2 as pb

FAST_S = 1.0
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
MAX_VALUES = 10_000

Tensor = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor
params = st.one_of(st.builds(pb.InferParameter, int64_param=st.integers(-2**63, 2**63 - 1)),
                   st.builds(pb.InferParameter, bool_param=st.booleans()),
                   st.builds(pb.InferParameter, string_param=st.text(max_size=8)),
                   st.builds(pb.InferParameter, double_param=st.floats(allow_nan=True)),
                   st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
                   st.just(pb.InferParameter()))
contents = st.builds(pb.InferTensorContents, bytes_contents=st.lists(st.binary(max_size=16), max_size=4),
                     uint_contents=st.lists(st.integers(0, 2**32 - 1), max_size=70),
                     int_contents=st.lists(st.integers(-2**31, 2**31 - 1), max_size=4))
tensors = st.builds(Tensor, name=st.sampled_from(["image", "x", ""]),
                    datatype=st.sampled_from(["UINT8", "BYTES", "FP32", "INT64", "", "uint8"]),
                    shape=st.lists(st.integers(-3, 2**40), max_size=9), contents=contents)
outputs = st.builds(Output, name=st.sampled_from(["logits", "probabilities", "heatmap", "x"]),
                    parameters=st.dictionaries(st.sampled_from(["classification", "binary_data"]), params,
                                               max_size=2))
requests = st.builds(pb.ModelInferRequest, model_name=st.sampled_from(["digits", ""]), id=st.text(max_size=8),
                     inputs=st.lists(tensors, max_size=3), outputs=st.lists(outputs, max_size=3),
                     raw_input_contents=st.lists(st.binary(max_size=80), max_size=3))


def _parse(msg) -> None:
    t0 = time.perf_counter()
    try:
        parse(msg, MAX_VALUES)
    except Refused as e:
        assert 400 <= e.status < 500, (e.status, str(e))
    assert time.perf_counter() - t0 < FAST_S


@FUZZ
@given(requests)
def test_structured_requests(msg) -> None:
    _parse(msg)


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_that_decode(raw: bytes) -> None:
    try:
        msg = pb.ModelInferRequest.FromString(raw)
    except DecodeError:
        return  # answered INVALID_ARGUMENT before parse (service.grpc_oip._decoding)
    _parse(msg)


@FUZZ
@given(requests, st.integers(0, 3))
def test_serialized_then_truncated(msg, cut: int) -> None:
    """A valid message cut short on the wire: decodes to a prefix or fails to decode, never worse."""
    raw = msg.SerializeToString()
    test_any_bytes_that_decode.hypothesis.inner_test(raw[:max(len(raw) - cut, 0)])
