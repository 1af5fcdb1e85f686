"""service.io.form_fields (after the lean route's body reader): the multipart parsing of /classify and /classify_batch, in-process.

Differential against Starlette's own ``request.form()`` (python-multipart) on generated forms,
encoded by an independent encoder (urllib3), and every refusal with its status and kind.
"""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.datastructures import UploadFile
from starlette.requests import Request
from urllib3.filepost import encode_multipart_formdata

from service.io import BadField, ClassifyBatchInput, ClassifyInput, MAX_TEXT_FIELDS, Upload, form_fields
from service.route import _read_body


def _request(body: bytes, ctype: str, chunks: int = 1) -> Request:
    pieces = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    messages = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(pieces)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"",
             "headers": [(b"content-type", ctype.encode("latin-1")), (b"content-length", str(len(body)).encode())]}
    return Request(scope, receive)


def _parse(body: bytes, ctype: str, cls=ClassifyBatchInput, field: str = "images", max_files: int = 64, chunks: int = 1):
    request = _request(body, ctype, chunks)
    whole = asyncio.run(_read_body(request.receive))
    return cls.model_construct(**form_fields(ctype, whole, request.scope, cls, field, max_files))


async def _starlette_form(body: bytes, ctype: str) -> list[tuple[str, str | None, bytes]]:
    form = await _request(body, ctype).form(max_files=1000, max_fields=1000)
    out = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            out.append((key, value.filename, await value.read()))
        else:
            out.append((key, None, value.encode()))
    await form.close()
    return out


names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters='"\\\r\n%'), min_size=1, max_size=12)
payloads = st.binary(max_size=300) | st.sampled_from([b"", b"\r\n", b"--", b"\r\n--x\r\n", b"\r\n\r\n"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(names, payloads), min_size=1, max_size=4), top_k=st.integers(1, 9),
       chunks=st.integers(1, 3))
def test_files_and_fields_match_starlette(files, top_k, chunks):
    fields = [("images", (fname, data, "application/octet-stream")) for fname, data in files] + [("top_k", str(top_k))]
    body, ctype = encode_multipart_formdata(fields)
    got = _parse(body, ctype, chunks=chunks)
    assert isinstance(got.images, list) and all(isinstance(u, Upload) for u in got.images)
    assert [(u.filename, u.data) for u in got.images] == [(f, d) for f, d in files]
    assert got.top_k == top_k
    reference = asyncio.run(_starlette_form(body, ctype))
    assert [(n, f, d) for n, f, d in reference if n == "images"] == [("images", u.filename, u.data) for u in got.images]


def test_single_image_form_and_unknown_fields_ignored():
    body, ctype = encode_multipart_formdata([("image", ("a.png", b"\x89PNG...", "image/png")), ("model", "digits"),
                                             ("colour", "blue")])
    got = _parse(body, ctype, ClassifyInput, "image")
    assert got.image == [Upload("a.png", "image/png", b"\x89PNG...")]
    assert got.model == "digits" and not hasattr(got, "colour")


def _refusal(got, field: str = "images") -> BadField:
    value = getattr(got, field)
    assert isinstance(value, BadField), value
    return value


@pytest.mark.parametrize("ctype", ["application/json", "multipart/form-data", "multipart/mixed; boundary=x", ""])
def test_not_a_multipart_form(ctype):
    assert _refusal(_parse(b"{}", ctype)).kind == "bad_content_type"


@pytest.mark.parametrize("body", [b"", b"garbage", b"--b\r\nContent-Disposition: form-data; name=\"images\"; "
                                  b"filename=\"a\"\r\n\r\nno closing delimiter", b"--b\r\n\r\n\r\n--b--\r\n"])
def test_malformed_body(body):
    bad = _refusal(_parse(body, "multipart/form-data; boundary=b"))
    assert (bad.status, bad.kind) == (400, "bad_multipart") and bad.message.startswith("malformed multipart body")


def test_text_in_a_file_field():
    body, ctype = encode_multipart_formdata([("images", "not a file")])
    assert _refusal(_parse(body, ctype)).kind == "bad_field"


def test_too_many_files_is_413_before_reading_them_all():
    body, ctype = encode_multipart_formdata([("images", (f"{i}.png", b"x", "image/png")) for i in range(5)])
    bad = _refusal(_parse(body, ctype, max_files=4))
    assert (bad.status, bad.kind) == (413, "too_many_files")
    assert len(_parse(body, ctype, max_files=5).images) == 5


def test_too_many_text_fields_is_400():
    fields = [("images", ("a.png", b"x", "image/png"))] + [(f"f{i}", "v") for i in range(MAX_TEXT_FIELDS + 1)]
    body, ctype = encode_multipart_formdata(fields)
    bad = _refusal(_parse(body, ctype))
    assert (bad.status, bad.kind) == (400, "bad_multipart")


def test_non_utf8_file_name_is_replaced_not_refused():
    body = (b'--b\r\nContent-Disposition: form-data; name="images"; filename="\xff\xfe.png"\r\n'
            b'Content-Type: image/png\r\n\r\nDATA\r\n--b--\r\n')
    got = _parse(body, "multipart/form-data; boundary=b")
    assert got.images == [Upload("\ufffd\ufffd.png", "image/png", b"DATA")]


def test_oversized_part_headers_are_413_and_named():
    body = (b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\nX-Pad: ' + b"x" * 5000
            + b"\r\n\r\nDATA\r\n--b--\r\n")
    bad = _refusal(_parse(body, "multipart/form-data; boundary=b"))
    assert (bad.status, bad.kind) == (413, "form_too_large") and "header" in bad.message
