"""BentoML's request timeout, without the timer it leaves behind for every request.

``TimeoutMiddleware`` arms ``loop.call_later(timeout, ...)`` per request and never cancels it, so
each answered request keeps a timer handle, its future and their closures alive for the whole
timeout (60 s by default): memory grew with the request rate (on every route, /livez included)
until the timers fired. ``install`` cancels the timer once the request is
done; the timeout's meaning (504 when no response has started in time) is unchanged.
"""
from __future__ import annotations

import asyncio
from typing import Any


def install() -> str:
    """Patch ``TimeoutMiddleware.__call__``; returns its qualified name. Raises RuntimeError if the
    pinned BentoML's middleware is not the one this was written against."""
    from bentoml._internal.server.http import traffic

    cls = traffic.TimeoutMiddleware
    if getattr(cls, "_imgserve_cancels_timer", False):
        return cls.__qualname__
    if not hasattr(cls, "_set_timer_out"):
        raise RuntimeError("BentoML's TimeoutMiddleware changed: service/timeouts.py needs the pinned BentoML")

    async def __call__(self: Any, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: dict) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                await traffic.JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                           status_code=504)(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    cls.__call__, cls._imgserve_cancels_timer = __call__, True
    return cls.__qualname__
