"""Locust load test for the imgserve service: real images, every response body checked.

Run it (bounded, headless; `python -m loadtests.run` wraps this and writes CSV, HTML and a summary):

    .venv/bin/locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:3000 \
        -u 16 -r 16 -t 30s --csv loadtests/results/manual/locust --html loadtests/results/manual/report.html

What the simulated users send (weights in brackets):
- [10] POST /classify with a small PNG (scikit-learn digits upscaled to 28 px, Fashion-MNIST test images);
- [6]  POST /classify with a real JPEG photo (china.jpg, flower.jpg) at 300, 640, 1000 or 2000 px;
- [2]  POST /classify_batch with 2-6 mixed images;
- [1]  a deliberately bad request (text, empty or truncated file, missing field, pixel bomb, unknown
       model, bad top_k) that must come back with the 4xx the API contract names and a JSON error;
- [1]  GET /models.
Each request picks one of the served models (or none: the default) and a top_k (or none: 5).

Every body is checked (checks.py): labels present and matching their index, scores in [0, 1],
highest first, summing to at most 1, top-k length right, the right model, and the known label for
the image. Known labels are learned once at start: every payload is classified by every model with
all its classes; where the top-1 margin is clear (>= KNOWN_MARGIN) the answer becomes that image's
known label, and every later answer for it must agree, single or batched. A wrong body is a
failure even with status 200; failures are named by kind ("wrong_label", "http_503", ...).

Environment:
LOADTEST_API_KEY (or IMGSERVE_API_KEY): sent as `Authorization: Bearer KEY`;
LOADTEST_RUN_SECONDS: stop this long after the warm-up (-t then only bounds the whole);
LOADTEST_MAX_REQUESTS: stop after this many requests (default unbounded: use -t);
LOADTEST_FINAL_STATS: a JSON file for the exact final figures (locust's CSV can be a second behind);
LOADTEST_WAIT (seconds of think time, uniform 0..W, default 0), LOADTEST_MODELS (comma list to
restrict the model choice), LOADTEST_PHOTO_SIDES (e.g. "300,640" to leave out big photos).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

import gevent
import gevent.lock
from locust import FastHttpUser, between, events, task
from locust.runners import MasterRunner, WorkerRunner

from loadtests.checks import (BodyError, ModelInfo, check_batch_body, check_classify_body, check_error_body,
                              parse_models)
from loadtests.payloads import BadCase, Payload, load_payloads, multipart

log = logging.getLogger(__name__)

KNOWN_MARGIN = 0.05          # top-1 minus top-2 probability needed to call a label "known"
DEFAULT_TOP_K = 5            # the API's default when top_k is absent
MAX_REQUESTS = int(os.environ.get("LOADTEST_MAX_REQUESTS", "0") or 0)
RUN_SECONDS = float(os.environ.get("LOADTEST_RUN_SECONDS", "0") or 0)
# The service's optional API key (issue 6): sent as a bearer token when set, never logged.
_KEY = os.environ.get("LOADTEST_API_KEY") or os.environ.get("IMGSERVE_API_KEY") or ""
AUTH = {"Authorization": f"Bearer {_KEY}"} if _KEY else {}
WAIT_S = float(os.environ.get("LOADTEST_WAIT", "0") or 0)


@dataclass
class ServiceView:
    """What the users share: served models, the default one, and known labels per (model, payload)."""

    models: dict[str, ModelInfo]
    default: str | None
    known: dict[tuple[str, str], str] = field(default_factory=dict)
    truth_agree: int = 0
    truth_total: int = 0


_view: ServiceView | None = None
_view_lock = gevent.lock.Semaphore()
_first_seen: set[str] = set()


def _http_json(url: str, body: bytes | None = None, ctype: str | None = None, timeout: float = 60.0) -> object:
    """One request outside locust's statistics (start-up only)."""
    req = urllib.request.Request(url, data=body, headers={**AUTH, **({"Content-Type": ctype} if ctype else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def learn_service(host: str) -> ServiceView:
    """GET /models, then classify every payload with every model once to learn the known labels."""
    models, default = parse_models(_http_json(host.rstrip("/") + "/models"))
    only = [m for m in os.environ.get("LOADTEST_MODELS", "").split(",") if m]
    if only:
        missing = sorted(set(only) - set(models))
        if missing:
            raise SystemExit(f"LOADTEST_MODELS names {missing}, not served; served: {sorted(models)}")
        models = {k: v for k, v in models.items() if k in only}
    if default is None and len(models) == 1:
        default = next(iter(models))
    view = ServiceView(models, default)
    for m in models.values():
        for p in load_payloads().all_good:
            body, ctype = multipart({"model": m.name, "top_k": str(m.num_classes)},
                                    [("image", (p.filename, p.data, p.content_type))])
            ans = _http_json(host.rstrip("/") + "/classify", body, ctype)
            preds = ans["predictions"]
            margin = preds[0]["score"] - (preds[1]["score"] if len(preds) > 1 else 0.0)
            if margin >= KNOWN_MARGIN:
                view.known[(m.name, p.name)] = preds[0]["label"]
            if p.true_label is not None and p.true_label in m.class_names:
                view.truth_total += 1
                view.truth_agree += preds[0]["label"] == p.true_label
    log.info("service: models %s (default %s); %d known (model, image) labels; "
             "ground truth agrees on %d/%d labelled images", sorted(models), default, len(view.known),
             view.truth_agree, view.truth_total)
    return view


def service_view(host: str) -> ServiceView:
    global _view
    with _view_lock:
        if _view is None:
            _view = learn_service(host)
        return _view


_count = {"requests": 0, "stopping": False}
_window = {"start": 0.0, "end": 0.0}   # wall clock of the measured part (after the warm-up)
FINAL_STATS = os.environ.get("LOADTEST_FINAL_STATS", "")


@events.request.add_listener
def _bound_requests(request_type, name, response_time, response_length, exception=None, context=None, **kw):
    """Stop the whole run after LOADTEST_MAX_REQUESTS requests (bounded in count, not only in time)."""
    _count["requests"] += 1
    if MAX_REQUESTS and _count["requests"] >= MAX_REQUESTS and not _count["stopping"]:
        _count["stopping"] = True
        env = getattr(_bound_requests, "env", None)
        if env is not None and env.runner is not None:
            _window["end"] = time.time()
            log.info("%d requests reached (LOADTEST_MAX_REQUESTS), stopping", _count["requests"])
            # from a greenlet of its own: quit() kills the users, and this listener runs in one of them
            gevent.spawn(env.runner.quit)


@events.init.add_listener
def _on_init(environment, **kw):
    _bound_requests.env = environment   # type: ignore[attr-defined]
    load_payloads()                     # build every payload once, before any user starts


@events.test_start.add_listener
def _on_test_start(environment, **kw):
    """Learn the models and known labels before the users start (and before -t's clock starts)."""
    if environment.host and not isinstance(environment.runner, MasterRunner):
        service_view(environment.host)
    _window["start"] = time.time()
    if RUN_SECONDS and not isinstance(environment.runner, WorkerRunner):
        gevent.spawn(_stop_after, environment, RUN_SECONDS)


def _stop_after(environment, seconds: float) -> None:
    """LOADTEST_RUN_SECONDS, counted from the end of the warm-up on the monotonic clock.

    Locust's -t counts on gevent's cached loop time, which runs early when start-up work blocked
    the loop (building the payloads takes seconds on a busy machine); run.py keeps -t as an outer bound.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gevent.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    if not _count["stopping"]:
        _count["stopping"] = True
        _window["end"] = time.time()
        log.info("run time of %.0f s reached (LOADTEST_RUN_SECONDS), stopping", seconds)
        environment.runner.quit()


@events.quit.add_listener
def _on_quit(exit_code, **kw):
    """Write LOADTEST_FINAL_STATS: exact final figures (locust's CSV is a snapshot up to a second old)."""
    env = getattr(_bound_requests, "env", None)
    if not FINAL_STATS or env is None or isinstance(env.runner, WorkerRunner):
        return
    window = time.time() - _window["start"] if _window["start"] else None
    if _count["stopping"] and _window["end"]:
        window = _window["end"] - _window["start"]

    def entry(e) -> dict:
        has = e.num_requests > 0
        return {"name": e.name, "method": e.method or "", "requests": e.num_requests, "failures": e.num_failures,
                "rps": e.num_requests / window if window else e.total_rps,
                **{f"p{q}_ms": (e.get_response_time_percentile(q / 100) if has else None) for q in (50, 95, 99)}}

    data = {"window_s": window, "total": entry(env.stats.total),
            "entries": [entry(e) for e in sorted(env.stats.entries.values(), key=lambda e: (e.name, e.method))],
            "errors": [{"method": e.method, "name": e.name, "error": str(e.error), "occurrences": e.occurrences}
                       for e in env.stats.errors.values()]}
    with open(FINAL_STATS, "w") as fh:
        json.dump(data, fh, indent=1)


class ImgServeUser(FastHttpUser):
    """A client that mixes small PNGs, big photos, batches and bad inputs, and checks every answer."""

    wait_time = between(0.0, WAIT_S)
    network_timeout = 30.0
    connection_timeout = 30.0

    def on_start(self) -> None:
        self.view = service_view(self.host)
        self.payloads = load_payloads()
        sides = os.environ.get("LOADTEST_PHOTO_SIDES")
        self.photos = [p for p in self.payloads.photos
                       if not sides or any(p.name.endswith(f"_{s}") for s in sides.split(","))] or list(self.payloads.photos)

    # --- request choice ---
    def _pick_model(self) -> str | None:
        """A served model by name, or None one time in five (the service's default)."""
        if self.view.default is not None and random.random() < 0.2:
            return None
        return random.choice(list(self.view.models))

    def _pick_top_k(self, model: ModelInfo) -> int | None:
        return None if random.random() < 0.3 else random.randint(1, min(10, model.num_classes))

    def _form(self, model: str | None, top_k: int | None) -> dict[str, str]:
        form = {}
        if model is not None:
            form["model"] = model
        if top_k is not None:
            form["top_k"] = str(top_k)
        return form

    def _fail(self, resp, kind: str, detail: str) -> None:
        """Mark a failure by kind; the first of each kind is logged with its detail."""
        if kind not in _first_seen:
            _first_seen.add(kind)
            log.warning("first %s failure: %s", kind, detail)
        resp.failure(kind)

    def _json_or_fail(self, resp):
        if not resp.status_code:   # no HTTP answer at all (refused, reset, timed out)
            self._fail(resp, f"connection_{type(resp.error).__name__}", str(resp.error))
            return None
        try:
            return json.loads(resp.content or b"null")
        except ValueError:
            self._fail(resp, "bad_json" if 200 <= resp.status_code < 300 else f"http_{resp.status_code}",
                       f"HTTP {resp.status_code}, body not JSON: {resp.content[:80]!r}")
            return None

    def _ok_json(self, resp):
        """The JSON body of a 200; anything else is failed (by its status) and gives None."""
        data = self._json_or_fail(resp)
        if data is not None and resp.status_code != 200:
            self._fail(resp, f"http_{resp.status_code}", str(data)[:200])
            return None
        return data

    def _classify(self, payload: Payload, group: str) -> None:
        model = self._pick_model()
        answering = model or self.view.default
        info = self.view.models[answering] if answering else next(iter(self.view.models.values()))
        top_k = self._pick_top_k(info)
        body, ctype = multipart(self._form(model, top_k), [("image", (payload.filename, payload.data, payload.content_type))])
        known = self.view.known.get((answering, payload.name)) if answering else None
        self._post_checked("/classify", body, ctype, f"/classify {group}", payload.name, lambda data: check_classify_body(
            data, models=self.view.models, requested=model, default=self.view.default, top_k=top_k or DEFAULT_TOP_K,
            known_label=known))

    def _post_checked(self, path: str, body: bytes, ctype: str, name: str, what: str,
                      check: Callable[[dict], None]) -> None:
        """POST a form; a 200 whose body ``check`` refuses (BodyError) is a failure of that kind."""
        with self.client.post(path, data=body, headers={**AUTH, "Content-Type": ctype}, name=name,
                              catch_response=True) as resp:
            data = self._ok_json(resp)
            if data is None:
                return
            try:
                check(data)
            except BodyError as e:
                return self._fail(resp, e.kind, f"{what}: {e}")
            resp.success()

    @task(10)
    def classify_small(self) -> None:
        p = random.choice(self.payloads.small)
        self._classify(p, p.kind)

    @task(6)
    def classify_photo(self) -> None:
        p = random.choice(self.photos)
        self._classify(p, f"photo_jpeg_{p.name.rsplit('_', 1)[1]}px")

    @task(2)
    def classify_batch(self) -> None:
        n = random.randint(2, 6)
        items = random.sample(self.payloads.small, n - 1) + [random.choice(self.photos)]
        random.shuffle(items)
        model = self._pick_model()
        answering = model or self.view.default
        top_k = self._pick_top_k(self.view.models[answering]) if answering else None
        files = [("images", (p.filename, p.data, p.content_type)) for p in items]
        body, ctype = multipart(self._form(model, top_k), files)
        known = [self.view.known.get((answering, p.name)) if answering else None for p in items]
        self._post_checked("/classify_batch", body, ctype, "/classify_batch 2-6 images", f"{n} images",
                           lambda data: check_batch_body(data, models=self.view.models, requested=model,
                                                         default=self.view.default, top_k=top_k or DEFAULT_TOP_K,
                                                         known_labels=known))

    @task(1)
    def bad_input(self) -> None:
        case: BadCase = random.choice(self.payloads.bad)
        body, ctype = multipart(dict(case.form), list(case.files))
        with self.client.post("/classify", data=body, headers={**AUTH, "Content-Type": ctype}, name=f"/classify bad {case.name}",
                              catch_response=True) as resp:
            if resp.status_code == 0:
                return self._fail(resp, f"connection_{type(resp.error).__name__}", str(resp.error))
            try:
                data = json.loads(resp.content or b"null")
            except ValueError:
                data = None
            try:
                check_error_body(resp.status_code, data, case.expected)
            except BodyError as e:
                return self._fail(resp, e.kind, f"{case.name}: {e}")
            resp.success()

    @task(1)
    def list_models(self) -> None:
        with self.client.get("/models", name="/models", headers=AUTH, catch_response=True) as resp:
            data = self._ok_json(resp)
            if data is None:
                return
            try:
                models, _ = parse_models(data)
            except BodyError as e:
                return self._fail(resp, e.kind, str(e))
            if not set(self.view.models) <= set(models):
                return self._fail(resp, "models_changed", f"{sorted(models)} lacks some of {sorted(self.view.models)}")
            resp.success()
