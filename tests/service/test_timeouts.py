"""service/timeouts.py: BentoML's request timeout applies to the pinned BentoML, still answers 504,
and leaves no timer behind per request (each one used to hold memory for the whole 60 s timeout)."""
from __future__ import annotations

import asyncio

from service import timeouts


def test_the_timeout_leaves_no_timer_behind() -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    assert timeouts.install() == "TimeoutMiddleware"

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def run() -> int:
        async def send(message):
            pass

        mw = TimeoutMiddleware(app, timeout=60)
        for _ in range(100):
            await mw({"type": "http"}, None, send)
        return sum(1 for h in asyncio.get_running_loop()._scheduled if not h.cancelled())

    assert asyncio.run(run()) == 0


def test_the_timeout_still_answers_504() -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    timeouts.install()
    sent = []

    async def slow(scope, receive, send):
        await asyncio.sleep(10)

    async def send(message):
        sent.append(message)

    asyncio.run(TimeoutMiddleware(slow, timeout=0.05)({"type": "http"}, None, send))
    assert sent[0]["status"] == 504
