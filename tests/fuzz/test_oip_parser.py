"""Hypothesis against the Open Inference Protocol parser (service/oip_tensors.py), in-process: any
body, JSON or binary, either parses or is refused with a 4xx ``Refused``: never another exception,
never a slow parse."""
from __future__ import annotations

import json
import struct
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import Refused
from service.oip_tensors import parse_request

FAST_S = 1.0  # a parse of these small bodies takes microseconds; a second means a pathological path
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                           | st.text(max_size=12), lambda children: st.lists(children, max_size=6)
                           | st.dictionaries(st.text(max_size=8), children, max_size=5), max_leaves=40)
shapes = st.lists(st.integers(-3, 2**40), max_size=10) | json_values
tensors = st.fixed_dictionaries({"name": st.sampled_from(["image", "x"]) | json_values,
                                 "datatype": st.sampled_from(["UINT8", "BYTES", "FP32", "INT64"]) | json_values,
                                 "shape": shapes},
                                optional={"data": json_values, "parameters": st.dictionaries(
                                    st.sampled_from(["binary_data_size", "content_type"]), json_values, max_size=2)})
requests = st.fixed_dictionaries({"inputs": st.lists(tensors, max_size=3) | json_values},
                                 optional={"id": json_values, "outputs": json_values, "parameters": json_values})


def _parse(body: bytes, header_length: str | None) -> None:
    t0 = time.perf_counter()
    try:
        parse_request(body, header_length, max_values=10_000)
    except Refused as e:
        assert 400 <= e.status < 500, (e.status, str(e))
    assert time.perf_counter() - t0 < FAST_S


@FUZZ
@given(requests)
def test_json_requests(doc) -> None:
    _parse(json.dumps(doc).encode(), None)


@FUZZ
@given(st.binary(max_size=400), st.none() | st.text(max_size=25))
def test_any_bytes_with_any_header_length(body: bytes, header_length) -> None:
    _parse(body, header_length)


@FUZZ
@given(requests, st.lists(st.binary(max_size=20), max_size=5), st.integers(-5, 5))
def test_binary_tensor_bodies(doc, elements, skew) -> None:
    """A JSON header, then BYTES elements (4-byte length + data), with the header length off by ``skew``."""
    head = json.dumps(doc).encode()
    tail = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    _parse(head + tail, str(max(len(head) + skew, 0)))
