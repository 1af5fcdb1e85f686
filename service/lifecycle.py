"""Process lifecycle of a serving worker: garbage-collector tuning once loaded, and stopping
`bentoml serve`'s supervisor when a worker can never start."""
from __future__ import annotations

import gc
import logging
import os
import signal

logger = logging.getLogger("service.service")  # the name these log lines always had


def tune_gc() -> None:
    """Fewer, cheaper garbage collections once everything is loaded.

    Each request allocates a few thousand short-lived objects (ASGI, BentoML, pydantic), so the
    default gen-0 threshold of 700 ran a collection every request or so, and the older
    generations kept re-scanning every module and model object loaded at start. Cycles are still
    collected, only less often (figures: docs/performance.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _stop_supervisor(reason: str) -> None:
    """A bad bundle or setting does not fix itself: log one line and stop `bentoml serve`, whose
    supervisor would otherwise restart this worker every few seconds forever, never ready."""
    logger.error("imgserve cannot start: %s", reason)
    ppid = os.getppid()
    try:
        cmd = open(f"/proc/{ppid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return
    if b"serve" in cmd and any(c.endswith((b"bentoml", b"bentoml.__main__")) for c in cmd):
        os.kill(ppid, signal.SIGTERM)

