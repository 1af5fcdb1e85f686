"""service/oip_tensors (the OIP wire format) without a server: framing both ways, and refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from service.errors import Refused
from service.oip_tensors import OutputTensor, encode_response, join_bytes, parse_request, split_bytes


def _binary(head: dict, *tensors: bytes) -> tuple[bytes, str]:
    js = json.dumps(head).encode()
    return js + b"".join(tensors), str(len(js))


def test_bytes_elements_round_trip() -> None:
    elements = [b"", b"\x00\xff" * 3, b"x" * 70000]
    assert split_bytes(join_bytes(elements)) == elements


def test_binary_request_with_uint8_and_bytes() -> None:
    px = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
    files = join_bytes([b"a", b"bc"])
    body, hlen = _binary({"id": "7", "parameters": {"binary_data_output": True},
                          "inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 3, 3, 1],
                                      "parameters": {"binary_data_size": px.nbytes}},
                                     {"name": "files", "datatype": "BYTES", "shape": [2, 1],
                                      "parameters": {"binary_data_size": len(files)}}],
                          "outputs": [{"name": "logits", "parameters": {"classification": 2, "binary_data": False}}]},
                         px.tobytes(), files)
    req = parse_request(body, hlen)
    assert req.id == "7" and req.binary_output
    np.testing.assert_array_equal(req.inputs[0].data, px)
    assert req.inputs[1].data == [b"a", b"bc"]
    (out,) = req.outputs
    assert (out.name, out.classification, out.binary) == ("logits", 2, False)


def test_raw_binary_request_is_one_file() -> None:
    req = parse_request(b"\x89PNG...", "0", raw_input="pixels")
    assert req.inputs[0].name == "pixels" and req.inputs[0].data == [b"\x89PNG..."] and req.binary_output


def test_response_binary_layout() -> None:
    logits = np.array([[1.5, -2.0]], np.float32)
    body, headers = encode_response({"model_name": "m"}, [
        OutputTensor("logits", "FP32", (1, 2), logits, True),
        OutputTensor("top", "BYTES", (1, 1), [b"1.5:0:cat"], True),
        OutputTensor("probabilities", "FP32", (1, 2), logits, False)])
    n = int(headers["inference-header-content-length"])
    head = json.loads(body[:n])
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"][:2]] == [8, 13]
    assert head["outputs"][2]["data"] == [1.5, -2.0]
    np.testing.assert_array_equal(np.frombuffer(body[n:n + 8], "<f4"), logits.ravel())
    assert split_bytes(body[n + 8:]) == [b"1.5:0:cat"]


@pytest.mark.parametrize("body,hlen,words", [
    (b"[1]", None, "JSON object"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [1]}], "id": 5}', None, "'id'"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1], "data": [1]}]}', None, "non-negative"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1]}]}', None, "neither 'data'"),
    (b'{"inputs": [{"name": "i", "datatype": "BYTES", "shape": [2], "data": ["YQ=="]}]}', None, "needs 2 BYTES"),
    (b'{"inputs": [{"name": "i", "datatype": "UINT8", "shape": [2], "data": [[1], [2, 3]]}]}', None, "ragged"),
    (b'{"inputs": [{"name": "i", "datatype": "UINT8", "shape": [1], "data": [1]}], "outputs": [{"name": "a"}, '
     b'{"name": "a"}]}', None, "twice"),
    (b'{"inputs": [{"name": "i", "datatype": "UINT8", "shape": [1], "data": [1]}], '
     b'"outputs": [{"name": "a", "parameters": {"classification": true}}]}', None, "positive integer"),
    (b'{"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}'
     b"\x05\x00\x00\x00ab", "101", "does not fit"),
])
def test_refusals_are_400_with_the_reason(body: bytes, hlen: str | None, words: str) -> None:
    with pytest.raises(Refused, match=words) as e:
        parse_request(body, hlen)
    assert e.value.status == 400
