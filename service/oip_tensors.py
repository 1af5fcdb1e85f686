"""Open Inference Protocol v2 wire format: request bodies in, response bodies out. No model here.

Two body layouts (Triton's binary tensor data extension):
- plain JSON (``Content-Type: application/json``);
- the JSON header followed by raw tensor bytes, with ``Inference-Header-Content-Length`` giving
  the header's length. Binary data follows in the order of the inputs that carry a
  ``binary_data_size`` parameter. ``Inference-Header-Content-Length: 0`` is Triton's raw binary
  request: the whole body is the single input's data.
Tensor bytes are little-endian, row-major; a BYTES element is a 4-byte little-endian length and
then its bytes. In JSON a BYTES element is a string; image files are binary, so here they are
base64 strings (JSON strings hold text, not bytes).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from service import jsonbounds
from service.errors import Refused

HEADER_LENGTH = "inference-header-content-length"
_BYTE_COUNT = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and few enough for int() to be instant
DEFAULT_MAX_VALUES = 1_000_000
MAX_RANK, MAX_DIM = 8, 2**31  # shapes beyond these are no image tensor, and would make math.prod slow
_NUMPY = {"UINT8": np.uint8, "FP32": np.float32}  # datatypes this service reads or writes as numbers


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any  # np.ndarray for numbers, list[bytes] for BYTES


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # Triton's classification extension: top-k as "value:index:label"


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output, with the request's default encoding
    binary_output: bool = False  # request-level binary_data_output
    parameters: dict = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    datatype: str  # FP32 or BYTES
    shape: tuple[int, ...]
    data: Any  # np.ndarray (FP32) or list[bytes] (BYTES), row-major
    binary: bool


def bad(message: str, kind: str = "bad_request", status: int = 400) -> Refused:
    return Refused(message, status, kind)


# -- requests ------------------------------------------------------------------------------------
def parse_request(body: bytes, header_length: str | None, raw_input: str = "image",
                  max_values: int = DEFAULT_MAX_VALUES) -> InferRequest:
    """An HTTP body (and its Inference-Header-Content-Length) -> InferRequest; 400 on any mistake.

    ``raw_input``: the input a raw binary request (header length 0) feeds, as one BYTES element.
    ``max_values``: the most JSON values the header may hold (413 over it, before it is parsed):
    the images a request may carry times the values of one image, plus room for the rest.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        n = _header_length(header_length, len(body))
        if n == 0:
            return InferRequest(None, [InputTensor(raw_input, "BYTES", (1,), [bytes(body)])], None, True)
        header, binary = body[:n], memoryview(body)[n:]
    try:
        doc = jsonbounds.loads(header, "the inference request", max_values)
    except Refused as e:
        if e.kind == "bad_json" and header_length is None:
            e.args = (f"{e} (binary tensor data needs the Inference-Header-Content-Length header)",)
        raise
    if not isinstance(doc, dict):
        raise bad("the inference request must be a JSON object with an 'inputs' list", "bad_json")
    params = _parameters(doc.get("parameters"), "request")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad(f"'id' must be a string, got {type(rid).__name__}")
    inputs = _inputs(doc.get("inputs"), binary, max_values)
    return InferRequest(rid, inputs, _outputs(doc.get("outputs")), _bool(params, "binary_data_output", "request"), params)


def _header_length(value: str, body_len: int) -> int:
    digits = value.strip()
    if not _BYTE_COUNT.fullmatch(digits):
        raise bad(f"Inference-Header-Content-Length must be a byte count, got {value[:40]!r}", "bad_binary")
    n = int(digits)
    if n > body_len:
        raise bad(f"Inference-Header-Content-Length is {n} but the body has only {body_len} bytes", "bad_binary")
    return n


def _parameters(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"'parameters' of the {where} must be a JSON object")
    return value


def _bool(params: dict, key: str, where: str) -> bool:
    v = params.get(key, False)
    if not isinstance(v, bool):
        raise bad(f"parameter '{key}' of the {where} must be true or false, got {v!r}")
    return v


def _inputs(value: Any, binary: memoryview | bytes, max_values: int) -> list[InputTensor]:
    if not isinstance(value, list) or not value:
        raise bad("the inference request needs a non-empty 'inputs' list")
    out, offset = [], 0
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad(f"inputs[{i}] must be a JSON object with name, datatype, shape and data")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise bad(f"inputs[{i}] needs a string 'name' and 'datatype'")
        if (not isinstance(shape, list) or not 0 < len(shape) <= MAX_RANK
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)):
            raise bad(f"input '{name}': 'shape' must be a list of 1 to {MAX_RANK} non-negative integers under {MAX_DIM}, "
                      f"got {str(shape)[:100]}")
        params = _parameters(item.get("parameters"), f"input '{name}'")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise bad(f"input '{name}': binary_data_size {size!r} does not fit the {len(binary) - offset} "
                          "bytes of binary data left in the body", "bad_binary")
            data = _from_binary(name, datatype, tuple(shape), binary[offset:offset + size], max_values)
            offset += size
        elif "data" in item:
            data = _from_json(name, datatype, tuple(shape), item["data"], params)
        else:
            raise bad(f"input '{name}' has neither 'data' nor a 'binary_data_size' parameter")
        out.append(InputTensor(name, datatype, tuple(shape), data))
    if offset != len(binary):
        raise bad(f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size", "bad_binary")
    return out


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)  # Python ints: no overflow, and much cheaper than np.prod on a short tuple


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], raw: memoryview, max_values: int) -> Any:
    if datatype == "BYTES":
        if _count(shape) > max_values:
            raise bad(f"input '{name}': shape {list(shape)} holds more than {max_values} BYTES elements", "too_many_values",
                      413)
        return _check_count(name, shape, split_bytes(raw, name, _count(shape)))
    dtype = _numeric(name, datatype)
    want = _count(shape) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise bad(f"input '{name}': shape {list(shape)} of {datatype} is {want} bytes, binary_data_size is {len(raw)}",
                  "bad_shape")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any, params: dict) -> Any:
    if datatype == "BYTES":
        return _check_count(name, shape, [_b64(name, i, s) for i, s in enumerate(_flat(data))])
    dtype = _numeric(name, datatype)
    try:
        a = np.asarray(data)
    except ValueError:
        raise bad(f"input '{name}': 'data' is a ragged nested list") from None
    if a.size and a.dtype.kind not in "iu":
        raise bad(f"input '{name}': {datatype} data must be integers, got {a.dtype.kind!r} values "
                  f"(first {a.ravel()[0]!r})", "bad_dtype")
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise bad(f"input '{name}': {datatype} values must be in {info.min}..{info.max}", "bad_dtype")
    if a.size != _count(shape):
        raise bad(f"input '{name}': shape {list(shape)} needs {_count(shape)} values, 'data' has {a.size}", "bad_shape")
    return a.astype(dtype).reshape(shape)


def _numeric(name: str, datatype: str) -> type:
    if datatype != "UINT8":
        raise bad(f"input '{name}': datatype {datatype} is not accepted; send UINT8 [N, H, W, C] preprocessed pixels "
                  "or BYTES [N] encoded image files", "bad_dtype")
    return _NUMPY[datatype]


def _flat(data: Any) -> Iterable[Any]:
    if isinstance(data, list):
        for d in data:
            yield from _flat(d)
    else:
        yield data


def _b64(name: str, i: int, s: Any) -> bytes:
    if isinstance(s, dict) and isinstance(s.get("b64"), str):  # the {"b64": ...} form of TF Serving/KServe v1
        s = s["b64"]
    if not isinstance(s, str):
        raise bad(f"input '{name}' element {i}: a BYTES element in JSON must be a base64 string, got "
                  f"{type(s).__name__}", "bad_bytes")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"input '{name}' element {i}: not valid base64 (image files in JSON are base64; or send them "
                  "as binary data with binary_data_size)", "bad_bytes") from None


def split_bytes(raw: memoryview | bytes, name: str = "tensor", most: int | None = None) -> list[bytes]:
    """A serialised BYTES tensor (4-byte little-endian length + bytes, repeated) -> its elements;
    a 400 as soon as there are more than ``most`` of them."""
    raw = memoryview(raw)
    out, pos = [], 0
    while pos < len(raw):
        if most is not None and len(out) == most:
            raise bad(f"input '{name}': more BYTES elements than its shape's {most}", "bad_shape")
        if pos + 4 > len(raw):
            raise bad(f"input '{name}': BYTES element {len(out)} has a truncated 4-byte length", "bad_binary")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise bad(f"input '{name}': BYTES element {len(out)} claims {n} bytes, {len(raw) - pos - 4} left",
                      "bad_binary")
        out.append(bytes(raw[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return out


def _check_count(name: str, shape: tuple[int, ...], elements: list[bytes]) -> list[bytes]:
    if len(elements) != _count(shape):
        raise bad(f"input '{name}': shape {list(shape)} needs {_count(shape)} BYTES elements, got {len(elements)}",
                  "bad_shape")
    return elements


def _outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad("'outputs' must be a list of {\"name\": ...} objects")
    out, seen = [], set()
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad(f"outputs[{i}] must be an object with a string 'name'")
        name = item["name"]
        if name in seen:
            raise bad(f"output '{name}' is requested twice")
        seen.add(name)
        params = _parameters(item.get("parameters"), f"output '{name}'")
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise bad(f"output '{name}': 'classification' must be a positive integer (top-k), got {k!r}",
                      "bad_classification")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise bad(f"output '{name}': 'binary_data' must be true or false, got {binary!r}")
        out.append(RequestedOutput(name, binary, k))  # binary None: the request's default
    return out


# -- responses -----------------------------------------------------------------------------------
def join_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements -> the serialised tensor (4-byte little-endian length + bytes each)."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def encode_response(doc: dict, outputs: list[OutputTensor]) -> tuple[bytes, dict[str, str]]:
    """The response head ``doc`` (model_name, model_version, id) plus outputs -> (body, headers)."""
    chunks, items = [], []
    for o in outputs:
        item: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if o.binary:
            raw = join_bytes(o.data) if o.datatype == "BYTES" else np.ascontiguousarray(o.data, "<f4").tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif o.datatype == "BYTES":
            item["data"] = [e.decode("utf-8", "replace") for e in o.data]
        else:
            item["data"] = np.asarray(o.data, dtype=np.float32).ravel().tolist()
        items.append(item)
    head = json.dumps({**doc, "outputs": items}, separators=(",", ":")).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {"content-type": "application/octet-stream",
                                     "inference-header-content-length": str(len(head))}
