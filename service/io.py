"""Request parsing for the multipart APIs, and JSON responses.

BentoML's own multipart parsing is bypassed on purpose for image fields:
- ``bytes`` fails with HTTP 500 on binary files (UnicodeDecodeError), ``Path`` writes a temp file,
  and ``PIL.Image`` opens with a format taken from the client's Content-Type, so a wrong
  Content-Type or a non-image raises outside pydantic and answers 500;
- a *string* in a file field is fetched as a URL by BentoML's serde (a request could make the
  server download anything).
``ImageUpload`` keeps the OpenAPI schema of a file upload (Swagger shows a file picker,
``bentoml.SyncHTTPClient`` sends multipart), and ``form_fields`` below (called by the lean route,
service/route.py, which answers every POST to these APIs) keeps each file as an in-memory ``Upload``
(no temp file) or a ``BadField`` that the API turns into a 4xx.
"""
from __future__ import annotations

import functools
import json
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import Field
from pydantic_core import core_schema
import multipart
from starlette.responses import Response

import bentoml


class ImageUpload(pathlib.PurePosixPath):
    """An uploaded image file (multipart). A PurePath subclass so BentoML treats it as a file field."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.any_schema()

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"type": "file", "format": "image"}


# Set in the ASGI scope by the guard middleware when a body without Content-Length grows past the
# limit (it then ends the body stream; BentoML would turn an exception into a 500).
TOO_LARGE_KEY = "imgserve.body_too_large"


@dataclass(frozen=True)
class BadField:
    """A form field that could not be parsed; the API answers ``status`` with ``message``."""

    message: str
    status: int = 400
    kind: str = "bad_request"


@dataclass(frozen=True)
class Upload:
    """One file part of the form, held in memory (the body is bounded by IMGSERVE_MAX_BODY_BYTES)."""

    filename: str
    content_type: str | None
    data: bytes


MAX_TEXT_FIELDS = 32


def form_fields(content_type: str, body: bytes | None, scope: dict, cls: type[bentoml.IODescriptor], file_field: str,
                max_files: int) -> dict[str, Any]:
    """The form's fields of ``cls`` by name (absent ones left out); ``body`` None: the guard cut it off."""
    data: dict[str, Any] = {file_field: None}
    try:
        parts = _split_parts(content_type, body, scope, file_field, max_files)
    except BadFieldError as e:
        data[file_field] = e.field
        return data
    for name, filename, ctype, payload in parts:
        if name == file_field:
            if filename is None:
                data[name] = BadField(f"field '{name}' must be a file upload, not text", 400, "bad_field")
            elif not isinstance(data[name], BadField):
                data[name] = (data[name] or []) + [Upload(filename, ctype, payload)]
        elif name in _form_names(cls):
            v = payload[:1024].decode("utf-8", "replace")
            key = _form_names(cls)[name]
            data[key] = TEXT_FIELDS.get(key, str)(v)
    return data


@functools.lru_cache(maxsize=None)
def _form_names(cls: type[bentoml.IODescriptor]) -> dict[str, str]:
    """Form field name -> parameter name (``class`` is a Python keyword: its parameter is ``class_``)."""
    return {(f.alias or k): k for k, f in cls.model_fields.items()}


def _integer(text: str) -> int | str:
    """``top_k``: a decimal integer, else the text as sent (the API answers 400 naming it)."""
    s = text.strip()
    return int(s) if re.fullmatch(r"[+-]?[0-9]{1,9}", s) else text


# Text form fields are strings (a model named "null" or "1e5" stays that string); only these are
# converted. JSON-decoding every field once made `model=null` select the default model.
TEXT_FIELDS: dict[str, Callable[[str], Any]] = {"top_k": _integer}


def _utf8(latin1: str | None) -> str | None:
    return None if latin1 is None else latin1.encode("latin-1").decode("utf-8", "replace")


class BadFieldError(Exception):
    def __init__(self, field: BadField) -> None:
        super().__init__(field.message)
        self.field = field


def _split_parts(content_type: str, body: bytes | None, scope: dict, file_field: str,
                 max_files: int) -> list[tuple[str, str | None, str | None, bytes]]:
    """(name, filename or None for text, content type, payload) of every part, in order."""
    ctype, options = multipart.parse_options_header(content_type)
    if ctype != "multipart/form-data" or not options.get("boundary"):
        raise BadFieldError(BadField(f"send a multipart/form-data request with the image file in the '{file_field}' "
                                     f"field (curl -F {file_field}=@photo.jpg ...)", 400, "bad_content_type"))
    if body is None:
        raise BadFieldError(BadField(f"request body is over the limit of {scope[TOO_LARGE_KEY]} bytes "
                                     "(IMGSERVE_MAX_BODY_BYTES)", 413, "body_too_large"))
    parts: list[tuple[str, str | None, str | None, bytes]] = []
    files = fields = 0
    try:
        # Headers are read as latin-1 (every byte is valid) and names re-decoded as UTF-8 with
        # replacement: a client's odd file name must not cost it its answer.
        with multipart.PushMultipartParser(options["boundary"], len(body), header_charset="latin1",
                                           max_segment_count=max_files + MAX_TEXT_FIELDS + 1) as parser:
            segment, chunks = None, []
            for event in parser.parse(body):
                if isinstance(event, multipart.MultipartSegment):
                    segment, chunks = event, []
                    files += event.filename is not None
                    fields += event.filename is None
                    if files > max_files:
                        raise BadFieldError(BadField(f"more than {max_files} files in one request", 413,
                                                     "too_many_files"))
                    if fields > MAX_TEXT_FIELDS:
                        raise BadFieldError(BadField(f"more than {MAX_TEXT_FIELDS} text fields in one request", 400,
                                                     "bad_multipart"))
                elif event is None:
                    parts.append((_utf8(segment.name), _utf8(segment.filename), segment.content_type, b"".join(chunks)))
                else:
                    chunks.append(event)
    except multipart.ParserLimitReached as e:  # part headers too long or too many (files and fields are counted above)
        raise BadFieldError(BadField(f"multipart form over a limit: {e}", 413, "form_too_large")) from None
    except multipart.MultipartError as e:
        raise BadFieldError(BadField(f"malformed multipart body: {e}", 400, "bad_multipart")) from None
    return parts


class ClassifyInput(bentoml.IODescriptor):
    """POST /classify form."""

    image: ImageUpload = Field(description="The image file (JPEG, PNG, WebP, BMP, GIF, TIFF).")
    model: Optional[str] = Field(None, description="Model name (GET /models); the default model when absent.",
                                 examples=[None])
    top_k: Optional[int] = Field(None, ge=1, description="How many classes to return, 1..num_classes (default 5, "
                                 "or every class of a model with fewer).", examples=[5])
    version: Optional[str] = Field(None, description="Model version (GET /models): always answered by that version; "
                                   "absent: the model's traffic policy chooses (docs/rollouts.md).", examples=[None])


class ClassifyBatchInput(bentoml.IODescriptor):
    """POST /classify_batch form."""

    images: list[ImageUpload] = Field(description="Several image files; results come back in the same order.")
    model: Optional[str] = Field(None, description="Model name (GET /models); the default model when absent.",
                                 examples=[None])
    top_k: Optional[int] = Field(None, ge=1, description="How many classes to return per image, 1..num_classes "
                                 "(default 5, or every class of a model with fewer).", examples=[5])
    version: Optional[str] = Field(None, description="Model version (GET /models): always answered by that version; "
                                   "absent: the model's traffic policy chooses (docs/rollouts.md).", examples=[None])


class Prediction(bentoml.IODescriptor):
    label: str
    index: int
    score: float


class ClassifyOutput(bentoml.IODescriptor):
    model: str
    version: str
    predictions: list[Prediction]


class ClassifyBatchOutput(bentoml.IODescriptor):
    model: str
    version: str
    results: list[dict]


def header(scope: dict, name: bytes) -> str | None:
    """One request header (lower-case ``name``) from an ASGI scope, decoded as Starlette does."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A raw starlette Response: skips BentoML's output-schema work (its cost: docs/performance.md)."""
    return Response(json.dumps(body, separators=(",", ":")).encode(), status_code=status,
                    media_type="application/json", headers=headers)


MAX_ERROR_CHARS = 500  # messages quote what the client sent (names, values): never echo a whole body back


def error_response(message: str, status: int, **extra: Any) -> Response:
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS - 3] + "..."
    return json_response({"error": message, **extra}, status, headers)
