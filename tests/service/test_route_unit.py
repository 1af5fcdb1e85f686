"""service.route.LeanRoute without a server: which requests it answers, and with what."""
from __future__ import annotations

import asyncio

from service.io import TOO_LARGE_KEY
from service.oip import INFER_PATH
from service.route import LeanRoute
from starlette.responses import Response


def _call(route: LeanRoute, method: str, path: str, chunks: list[bytes], scope_extra: dict | None = None) -> list[dict]:
    scope = {"type": "http", "method": method, "path": path, "headers": [], **(scope_extra or {})}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        sent.append(msg)

    asyncio.run(route(scope, receive, send))
    return sent


def _route(calls: list) -> LeanRoute:
    async def app(scope, receive, send):
        calls.append(("app", scope["method"], scope["path"]))
        await Response(b"app")(scope, receive, send)

    async def classify(scope, body):
        calls.append(("classify", body))
        return Response(b"classify")

    async def infer(scope, body, name, version):
        calls.append(("infer", name, version, body))
        return Response(b"infer")

    return LeanRoute(app, routes={"/classify": classify}, patterns={INFER_PATH: infer}, server_header="test")


def _body(sent: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_exact_and_pattern_routes_get_the_whole_body_and_path_groups():
    calls: list = []
    route = _route(calls)
    assert _body(_call(route, "POST", "/classify", [b"ab", b"cd"])) == b"classify"
    assert _body(_call(route, "POST", "/v2/models/m1/infer", [b"x"])) == b"infer"
    sent = _call(route, "POST", "/v2/models/m1/versions/7/infer", [b"y", b"z"])
    assert (b"server", b"test") in sent[0]["headers"]
    assert calls == [("classify", b"abcd"), ("infer", "m1", None, b"x"), ("infer", "m1", "7", b"yz")]


def test_everything_else_goes_to_the_app():
    calls: list = []
    route = _route(calls)
    for method, path in [("GET", "/classify"), ("GET", "/v2/models/m1/infer"), ("POST", "/v2/models/a/b/infer"),
                         ("POST", "/v2/models/m1/infer/x"), ("POST", "/classify/"), ("POST", "/v2/models//infer")]:
        assert _body(_call(route, method, path, [b""])) == b"app"
    assert [c[0] for c in calls] == ["app"] * 6


def test_disconnect_is_not_answered_but_a_cut_off_body_is():
    calls: list = []
    route = _route(calls)
    assert _call(route, "POST", "/v2/models/m/infer", []) == []  # the client went away
    assert _body(_call(route, "POST", "/v2/models/m/infer", [], {TOO_LARGE_KEY: 10})) == b"infer"
    assert calls == [("infer", "m", None, None)]


def test_an_answer_that_raises_is_a_bare_500():
    async def broken(scope, body):
        raise RuntimeError("bug")

    route = LeanRoute(None, routes={"/classify": broken}, server_header="test")
    sent = _call(route, "POST", "/classify", [b""])
    assert sent[0]["status"] == 500 and b"unexpected error" in _body(sent)


def test_the_form_route_needs_the_api_function_and_finds_it_in_the_pinned_bentoml():
    """The lean route calls ``APIMethod.func``; without it, it must fail loudly, not call the route again."""
    import pytest

    from service.io import ClassifyInput
    from service.route import FormRoute

    class Plain:
        def classify(self):
            return "not an APIMethod"

    with pytest.raises(RuntimeError, match="has no 'func'"):
        FormRoute("classify", ClassifyInput, "image", 1).handler(Plain())
    import service.service as svc

    instance = object.__new__(svc.ImgServe.inner)  # the user class under BentoML's Service wrapper
    method = getattr(type(instance), "classify")
    assert FormRoute("classify", ClassifyInput, "image", 1).handler(instance).__func__ is method.func
