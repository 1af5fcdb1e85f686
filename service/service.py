"""The BentoML service: ``bentoml serve service.service:ImgServe`` (from the repository root).

Request path (one process, one event loop):
  multipart parse (``service.io``) -> validate fields -> admission check (503 before any decode)
  -> decode + preprocess in a small thread pool (one upload per task, so a bad image fails alone)
  -> batcher (``service.batching``; one inference thread) -> softmax/top-k -> raw JSON Response.
Configuration: IMGSERVE_* environment variables (``service.config``).
"""
from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import bentoml
from imgformat.bundle import BundleError
from imgformat.preprocess import ImageError, stack
from service import (door, explain, metrics, metrics_labels, monitoring, oip, onewrite, repository, reuseport, rollout,
                     stall, timeouts)
from service.answer import answer, current_service
from service.config import Settings, load_settings
from service.errors import Refused as _Refused
from service.guard import GuardMiddleware
from service.io import (BadField, ClassifyBatchInput, ClassifyBatchOutput, ClassifyInput,
                        ClassifyOutput, json_response)
from service.lifecycle import _stop_supervisor, tune_gc
from service.models import ServedModel, load_models, softmax, top_k
from service.models import top_k as best_k  # /explain's parameter `top_k` hides the function
from service.pages import PagesMiddleware
from service.route import FormRoute, LeanRoute

logger = logging.getLogger(__name__)
# BentoML configures its own loggers only: without this, the service's INFO lines (settings, write path,
# each model's load and warm-up) never reach the server log.
logging.getLogger("service").setLevel(logging.INFO)

SETTINGS: Settings = load_settings()  # read at import: @bentoml.service(workers=...) below needs it
onewrite.install()  # each answer in one socket write: a killed replica sends all of it or nothing
timeouts.install()  # the request timeout's timer goes with its request, not 60 s later
reuseport.install(SETTINGS.workers)  # several workers: one SO_REUSEPORT socket each, so connections spread over them
door.install(lambda: current_service().versions.every())  # a new connection's kernel wait counts; late ones refused cheaply
metrics_labels.install()  # HTTP metrics by route template (no path a client invents adds series); request ids
INLINE_DECODE_PIXELS = 128 * 128  # decode smaller images on the event loop: cheaper than a thread hand-off


async def _models_view(request: Request) -> Response:
    async def work() -> Response:
        return json_response(current_service().describe_models())

    return await answer(work, "GET /models")



# GET routes and the Open Inference Protocol (BentoML APIs are POST-only multipart/JSON with
# BentoML's own error codes). Mounted passively after BentoML's own routes.
extra_routes = Starlette(routes=[Route("/models", _models_view, methods=["GET"]), *oip.routes, *repository.routes,
                                 *rollout.routes])


# OpenTelemetry's ASGI middleware matches these regexes anywhere in the full URL ("/" would match
# every URL). Tracing is off unless IMGSERVE_TRACING=1: the middleware's spans cost a noticeable share of
# the event loop (docs/performance.md), and they go nowhere until an exporter is configured in BentoML's configuration.
TRACED_NONE = [".*"]
TRACED_NOT = [r"^[a-z]+://[^/]+/(livez|readyz|healthz|metrics|v2/health/live|v2/health/ready)/?$"]

# The BentoML service options, shared with the benchmark's no-model floor service
# (loadtests/floor_service.py) so that both measure the same HTTP stack.
SERVICE_OPTIONS: dict[str, Any] = dict(
    workers=SETTINGS.workers,  # IMGSERVE_WORKERS; docs/performance.md says when more than one pays
    traffic={"timeout": SETTINGS.timeout_s},
    logging={"access": {"enabled": False}},  # costs event-loop time on every request (docs/performance.md)
    tracing={"excluded_urls": TRACED_NOT if SETTINGS.tracing else TRACED_NONE},
    metrics={"enabled": True},
)


@bentoml.asgi_app(extra_routes, path="/")
@bentoml.service(name="imgserve", **SERVICE_OPTIONS)
class ImgServe:
    """Image classification over HTTP for the configured bundles (IMGSERVE_MODELS)."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        logger.info("imgserve settings: %r", self.settings)
        logger.info("imgserve write path: %s", onewrite.WRITE_PATH)
        logger.info("imgserve door: %s", door.ACTIVE)
        # One inference thread for every model: the backend's intra-op pool uses all cores, and two
        # concurrent runs would only fight over them.
        self.infer_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgserve-infer")
        # Decoders: PIL releases the GIL, but more decoders than cores only thrash.
        self.decode_limiter = anyio.CapacityLimiter(max(1, self.settings.threads))
        self._ready = False
        self.models: dict[str, ServedModel] = {}  # name -> the version it answers by default
        try:
            # versions, shadows, the traffic policy file (docs/rollouts.md)
            self.versions, self.shadows, self.policy_file = rollout.setup(self, load_models(self.settings,
                                                                                         self.infer_executor))
        except (BundleError, ValueError) as e:
            _stop_supervisor(str(e))
            raise
        self.default = next(iter(self.models))
        self.repository = repository.ModelRepository(self)
        tune_gc()
        self._ready = True

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """OIP over gRPC (IMGSERVE_GRPC_PORT) on this worker's event loop: the same batcher as REST."""
        self._grpc = None
        if self.settings.grpc_port:
            from service import grpc_oip  # grpcio loads only when gRPC is on

            self._grpc = await grpc_oip.start(self, self.settings.grpc_host, self.settings.grpc_port)

    @bentoml.on_startup
    async def watch_traffic(self) -> None:
        """Re-read IMGSERVE_TRAFFIC when it changes, on this worker's event loop."""
        self._traffic_watch = rollout.watch(self.policy_file)

    @bentoml.on_startup
    async def watch_drift(self) -> None:
        """Flush live statistics and rescore drift in the background (service/monitoring.py)."""
        self._monitoring = monitoring.start(self.versions.every)

    @bentoml.on_startup
    async def watch_stalls(self) -> None:
        """Dump every thread's stack to the log when this worker's event loop stalls (service/stall.py)."""
        self._stall_watch = stall.watch(self.settings.stall_dump_s)

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if getattr(self, "_grpc", None) is not None:
            await self._grpc.stop(grace=5)

    def __is_ready__(self) -> bool:
        return self._ready

    # -- helpers ---------------------------------------------------------------------------------
    def describe_models(self) -> dict[str, Any]:
        return {"default": self.default, "api_key_required": self.settings.api_key is not None,
                "models": [{**m.describe(self.settings.precision), "default_version": self.models[m.name] is m}
                           for m in self.versions.every()],
                **rollout.describe(self)}

    def _choose(self, name: Optional[str], version: Optional[str]) -> rollout.Choice:
        """The request's version (and shadow): chosen once, right before its admission."""
        # The default name is gone when the repository API unloaded every model: 404 then.
        return self.versions.choose(name or self.default, version or None)

    @staticmethod
    def _top_k(value: Any, model: ServedModel) -> int:
        n = len(model.class_names)
        if value is None:
            return min(5, n)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Refused(f"top_k must be an integer in 1..{n}, got {value!r}", 400, "bad_top_k")
        if not 1 <= value <= n:
            raise _Refused(f"top_k must be in 1..{n} for model {model.name!r}, got {value}", 400, "bad_top_k")
        return value

    @staticmethod
    def _files(value: Any, field: str, limit: int) -> list:
        if isinstance(value, BadField):
            raise _Refused(value.message, value.status, value.kind)
        if not value:
            raise _Refused(f"missing the '{field}' file field: send the image as multipart form field '{field}' "
                           f"(curl -F {field}=@photo.jpg ...)", 400, "missing_image")
        if len(value) > limit:
            raise _Refused(f"{len(value)} files in one request; at most {limit}", 413, "too_many_files")
        return value

    @staticmethod
    def _finish(model: ServedModel, img: Any, t0: float) -> np.ndarray:
        arr = model.preprocessor.finish(img)
        metrics.for_model(metrics.PREPROCESS, model.name).observe(time.perf_counter() - t0)
        return arr

    async def _decode(self, model: ServedModel, upload: Any) -> np.ndarray:
        """One upload -> (H, W, C) uint8. Small images decode on the event loop (a thread hop costs
        more than decoding a 28x28 PNG); big ones in a decoder thread, where PIL releases the GIL."""
        t0 = time.perf_counter()
        try:
            img = model.preprocessor.open(io.BytesIO(upload.data))  # header only: size checks, no pixels yet
            model.monitor.saw_size(img.width, img.height)
            if img.width * img.height <= INLINE_DECODE_PIXELS:
                return self._finish(model, img, t0)
            return await anyio.to_thread.run_sync(self._finish, model, img, t0, limiter=self.decode_limiter)
        except ImageError:
            model.monitor.decode_failed(upload.data)
            raise

    async def _prepare(self, model: ServedModel, uploads: list) -> np.ndarray:
        """Decode every upload on its own; the first bad one refuses the request, naming the file."""
        arrays = []
        for i, up in enumerate(uploads):
            try:
                arrays.append(await self._decode(model, up))
            except ImageError as e:
                where = f" (file {i}: {up.filename!r})" if len(uploads) > 1 else ""
                raise _Refused(f"{e}{where}", e.status, e.kind) from None
        return stack(arrays)

    async def _classify(self, uploads_value: Any, field: str, limit: int, model_name: Any, version: Any,
                        k: Any) -> tuple[ServedModel, list]:
        choice = self._choose(model_name, version)
        model = choice.live
        kk = self._top_k(k, model)
        uploads = self._files(uploads_value, field, limit)
        with model.batcher.admitted(len(uploads)):  # shed load before spending CPU on decoding
            pixels = await self._prepare(model, uploads)  # (n, H, W, C) uint8
            logits = await model.batcher.infer(pixels)  # (n, num_classes)
        self.shadows.start(model, choice.shadow, pixels, logits)  # in the background; never awaited here
        model.monitor.observe(pixels, logits)
        return model, [top_k(row, kk, model.class_names) for row in logits]

    # -- API -------------------------------------------------------------------------------------
    @bentoml.api(route="/classify", input_spec=ClassifyInput, output_spec=ClassifyOutput)
    async def classify(self, image: Any = None, model: Optional[str] = None, top_k: Optional[int] = None,
                       version: Optional[str] = None) -> Response:
        """Classify one image. Multipart: `image` (file), optional `model`, `version` and `top_k`.

        `curl -F image=@photo.jpg -F top_k=3 http://127.0.0.1:3000/classify`
        """
        async def run() -> Response:
            m, preds = await self._classify(image, "image", 1, model, version, top_k)
            return json_response({"model": m.name, "version": m.version, "predictions": preds[0]},
                                 headers=rollout.version_header(m))

        return await answer(run, "POST /classify")

    @bentoml.api(route="/classify_batch", input_spec=ClassifyBatchInput, output_spec=ClassifyBatchOutput)
    async def classify_batch(self, images: Any = None, model: Optional[str] = None, top_k: Optional[int] = None,
                             version: Optional[str] = None) -> Response:
        """Classify several images (`images` repeated); results in the same order.

        `curl -F images=@a.png -F images=@b.jpg http://127.0.0.1:3000/classify_batch`
        """
        async def run() -> Response:
            m, preds = await self._classify(images, "images", self.settings.max_images, model, version, top_k)
            return json_response({"model": m.name, "version": m.version,
                                  "results": [{"predictions": p} for p in preds]}, headers=rollout.version_header(m))

        return await answer(run, "POST /classify_batch")

    @bentoml.api(route="/explain", input_spec=explain.ExplainInput, output_spec=explain.ExplainOutput)
    async def explain(self, image: Any = None, model: Optional[str] = None, top_k: Optional[int] = None,
                      class_: Optional[str] = None, heatmap: Optional[str] = None,
                      opacity: Optional[float] = None, version: Optional[str] = None) -> Response:
        """Classify one image and show where the evidence for a class is (a class-activation map).

        Multipart: /classify's fields, plus `class` (index or label; default the top-1 class),
        `heatmap` (array | png | both) and `opacity` (0..1, for the PNG overlay).
        `curl -F image=@photo.jpg -F heatmap=png http://127.0.0.1:3000/explain`
        """
        async def run() -> Response:
            m = self._choose(model, version).live  # explanations run on the live version only
            explainer = explain.explainer_of(m)
            kk = self._top_k(top_k, m)
            wanted = explain.resolve_class(class_, m.class_names)
            output, alpha = explain.resolve_output(heatmap), explain.resolve_opacity(opacity)
            uploads = self._files(image, "image", 1)
            with explainer.batcher.admitted(1):
                pixels = await self._prepare(m, uploads)
                logits, chosen, heat = await explainer.maps(pixels, [wanted])
            original = box = None
            if output != "array":
                original = explain.open_original(m.preprocessor, uploads[0].data)
                box = m.preprocessor.input_box(*original.size)
            c = int(chosen[0])
            score = float(softmax(logits[0])[c])
            return json_response({"model": m.name, "version": m.version,
                                  "predictions": best_k(logits[0], kk, m.class_names),
                                  "explained": {"index": c, "label": m.class_names[c], "score": score,
                                                "method": "cam", "layer": explainer.layer},
                                  "heatmap": await anyio.to_thread.run_sync(
                                      explain.heatmap_body, heat[0], output, original, box, alpha,
                                      limiter=self.decode_limiter)}, headers=rollout.version_header(m))

        return await answer(run, "POST /explain")



# The lean path (service/route.py), inside the guard: the form APIs' own functions and OIP inference,
# without BentoML's per-request machinery around them.
FORM_ROUTES = {"/classify": FormRoute("classify", ClassifyInput, "image", SETTINGS.max_images),
               "/classify_batch": FormRoute("classify_batch", ClassifyBatchInput, "images", SETTINGS.max_images),
               "/explain": FormRoute("explain", explain.ExplainInput, "image", SETTINGS.max_images)}
OIP_ROUTES = {oip.INFER_PATH: oip.answer_infer}
OIP_BUDGETS = {oip.INFER_PATH: oip.infer_values_budget}

ImgServe.add_asgi_middleware(GuardMiddleware, max_body_bytes=SETTINGS.max_body_bytes, api_key=SETTINGS.api_key,
                             models=lambda: current_service().versions.every())
ImgServe.add_asgi_middleware(LeanRoute, routes=FORM_ROUTES, patterns=OIP_ROUTES, budgets=OIP_BUDGETS,
                             server_header="BentoML Service/imgserve")
ImgServe.add_asgi_middleware(PagesMiddleware)  # / and /demo (BentoML's / loads a tracker from the internet)
