"""The HTTP floor for `loadtests.bench`: our service's HTTP stack with the model taken out.

    bentoml serve loadtests.floor_service:Floor --host 127.0.0.1 --port 3001

Same BentoML options (``SERVICE_OPTIONS``, IMGSERVE_WORKERS included), the same guard middleware,
the same lean route (``service.route``), the same garbage-collector tuning and the same multipart
input (``ClassifyInput``, parsed by ``service.io``) as
``service.service:ImgServe``; ``POST /classify`` then answers a fixed JSON body of the usual
size without decoding the image or running a model. What it serves per second is the most any
model could be served at through this stack on this machine: the "trivial endpoint" the
small-model target is measured against. Not part of the product.
"""
from __future__ import annotations

from typing import Any, Optional

from starlette.responses import Response

import bentoml
from service.io import ClassifyInput, ClassifyOutput, json_response
from service.route import FormRoute, LeanRoute
from service.service import SERVICE_OPTIONS, SETTINGS, GuardMiddleware, tune_gc

# The length of a real answer with five predictions, so both write the same bytes.
ANSWER = {"model": "floor", "version": "1", "predictions": [
    {"label": f"class {i}", "index": i, "score": 0.2} for i in range(5)]}


@bentoml.service(name="imgserve-floor", **SERVICE_OPTIONS)
class Floor:
    def __init__(self) -> None:
        tune_gc()

    @bentoml.api(route="/classify", input_spec=ClassifyInput, output_spec=ClassifyOutput)
    async def classify(self, image: Any = None, model: Optional[str] = None, top_k: int = 5,
                       version: Optional[str] = None) -> Response:
        return json_response(ANSWER)


Floor.add_asgi_middleware(GuardMiddleware, max_body_bytes=SETTINGS.max_body_bytes, api_key=SETTINGS.api_key)
Floor.add_asgi_middleware(LeanRoute, routes={"/classify": FormRoute("classify", ClassifyInput, "image", SETTINGS.max_images)},
                          server_header="BentoML Service/imgserve-floor")
