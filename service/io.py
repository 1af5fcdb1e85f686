"""Request parsing for the multipart APIs, and JSON responses.

BentoML's own multipart parsing is bypassed on purpose for image fields:
- ``bytes`` fails with HTTP 500 on binary files (UnicodeDecodeError), ``Path`` writes a temp file,
  and ``PIL.Image`` opens with a format taken from the client's Content-Type, so a wrong
  Content-Type or a non-image raises outside pydantic and answers 500;
- a *string* in a file field is fetched as a URL by BentoML's serde (a request could make the
  server download anything).
``ImageUpload`` keeps the OpenAPI schema of a file upload (Swagger shows a file picker,
``bentoml.SyncHTTPClient`` sends multipart), and ``from_http_request`` below keeps the raw
``UploadFile`` (in memory, no temp file) or a ``BadField`` that the API turns into a 400.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import Field
from pydantic_core import core_schema
from starlette.datastructures import UploadFile
from starlette.requests import Request
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


async def parse_form(request: Request, cls: type[bentoml.IODescriptor], file_field: str,
                     max_files: int) -> bentoml.IODescriptor:
    """Multipart form -> the input model, unvalidated: the API validates and answers clear 4xx.

    ``file_field`` holds a list of UploadFile, None (absent) or a BadField (whole request unusable).
    """
    ctype = request.headers.get("content-type", "")
    data: dict[str, Any] = {file_field: None}
    if not ctype.startswith("multipart/form-data"):
        data[file_field] = BadField(f"send a multipart/form-data request with the image file in the '{file_field}' "
                                    f"field (curl -F {file_field}=@photo.jpg ...)", 400, "bad_content_type")
        return cls.model_construct(**data)
    try:
        form = await request.form(max_files=max_files, max_fields=32)
    except Exception as e:  # starlette raises HTTPException/MultiPartException/ValueError on malformed bodies
        if request.scope.get(TOO_LARGE_KEY):
            data[file_field] = BadField(f"request body is over the limit of {request.scope[TOO_LARGE_KEY]} bytes "
                                        "(IMGSERVE_MAX_BODY_BYTES)", 413, "body_too_large")
            return cls.model_construct(**data)
        msg = getattr(e, "detail", None) or str(e) or type(e).__name__
        status, kind = (413, "too_many_files") if "Too many files" in msg else (400, "bad_multipart")
        data[file_field] = BadField(f"malformed multipart body: {msg}", status, kind)
        return cls.model_construct(**data)
    for key in form:
        values = form.getlist(key)
        if key == file_field:
            files = [v for v in values if isinstance(v, UploadFile)]
            if len(files) != len(values):
                data[key] = BadField(f"field '{key}' must be a file upload, not text", 400, "bad_field")
            else:
                data[key] = files
        elif key not in cls.model_fields:
            continue
        else:
            v = values[-1]
            if isinstance(v, UploadFile):
                v = (await v.read(1024)).decode("utf-8", "replace")
            try:
                data[key] = json.loads(v)
            except (json.JSONDecodeError, TypeError):
                data[key] = v
    return cls.model_construct(**data)


class ClassifyInput(bentoml.IODescriptor):
    """POST /classify form."""

    image: ImageUpload = Field(description="The image file (JPEG, PNG, WebP, BMP, GIF, TIFF).")
    model: Optional[str] = Field(None, description="Model name (GET /models); the default model when absent.",
                                 examples=[None])
    top_k: int = Field(5, ge=1, description="How many classes to return, 1..num_classes.", examples=[5])

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> "ClassifyInput":
        return await parse_form(request, cls, "image", max_files=_max_images())


class ClassifyBatchInput(bentoml.IODescriptor):
    """POST /classify_batch form."""

    images: list[ImageUpload] = Field(description="Several image files; results come back in the same order.")
    model: Optional[str] = Field(None, description="Model name (GET /models); the default model when absent.",
                                 examples=[None])
    top_k: int = Field(5, ge=1, description="How many classes to return per image, 1..num_classes.", examples=[5])

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> "ClassifyBatchInput":
        return await parse_form(request, cls, "images", max_files=_max_images())


def _max_images() -> int:
    import os

    return int(os.environ.get("IMGSERVE_MAX_IMAGES", "64") or 64)


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


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A raw starlette Response: skips BentoML's output-schema work (~1 ms per response here)."""
    return Response(json.dumps(body, separators=(",", ":")).encode(), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(message: str, status: int, **extra: Any) -> Response:
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    return json_response({"error": message, **extra}, status, headers)
