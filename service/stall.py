"""Event-loop stall watchdog: when a worker's event loop has not run for IMGSERVE_STALL_DUMP_S
seconds, log it and dump every thread's Python stack to the worker's stderr (the serve log).

Everything a worker answers (HTTP, gRPC, health, /metrics, small models' batches) runs on its one
event loop, so a loop stuck in a blocking call or a deadlock answers nothing, and from outside it
looks like a hung process with an empty log. The dump names the line it is stuck on, once per stall;
``imgserve_event_loop_stalls_total`` counts the stalls so that an alert can fire on them.

A heartbeat callback on the loop stamps the time every ``BEAT_S`` (or a quarter of the threshold); a daemon thread (it needs no GIL
time the loop wants: it sleeps between looks) compares the stamp with the clock.
"""
from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
import threading
import time
from dataclasses import dataclass, field

import bentoml

logger = logging.getLogger(__name__)
BEAT_S = 0.25

STALLS = bentoml.metrics.Counter(name="imgserve_event_loop_stalls", documentation=(
    "Times this worker's event loop did not run for IMGSERVE_STALL_DUMP_S seconds (its stacks are in the log)"))


@dataclass
class Watchdog:
    """Watches one event loop; ``stop()`` ends the heartbeat and the thread."""

    loop: asyncio.AbstractEventLoop
    threshold_s: float
    file: object = None  # where the stacks go (a file with fileno(); default sys.stderr)
    last_beat: float = field(default_factory=time.monotonic)
    stalls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _handle: asyncio.TimerHandle | None = None

    def start(self) -> "Watchdog":
        self._beat()
        threading.Thread(target=self._watch, name="imgserve-stall-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()

    def _beat(self) -> None:
        self.last_beat = time.monotonic()
        self._handle = self.loop.call_later(min(BEAT_S, self.threshold_s / 4), self._beat)

    def _watch(self) -> None:
        reported = None  # the beat a stall was reported for: one dump per stall
        while not self._stop.wait(min(1.0, self.threshold_s / 4)):
            beat = self.last_beat
            stalled = time.monotonic() - beat
            if stalled >= self.threshold_s and reported != beat:
                reported = beat
                self._report(stalled)
            elif reported is not None and reported != beat:
                logger.warning("imgserve: the event loop ran again after a stall of over %.1f s", self.threshold_s)
                reported = None

    def _report(self, stalled: float) -> None:
        # The stacks first, written without a lock: a deadlock on the logging or the metrics lock
        # would stop the log line and the counter, and the stacks are what says where it is stuck.
        out = self.file or sys.stderr
        out.write(f"imgserve: the event loop has not run for {stalled:.1f} s (IMGSERVE_STALL_DUMP_S="
                  f"{self.threshold_s:g}); every thread's stack follows\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        out.flush()
        self.stalls += 1
        STALLS.inc()
        logger.error("imgserve: event loop stalled for %.1f s; the stacks are above in this log", stalled)


def watch(threshold_s: float, file=None) -> Watchdog | None:
    """Watch the running event loop (None where ``threshold_s`` is 0: off)."""
    if threshold_s <= 0:
        return None
    return Watchdog(asyncio.get_running_loop(), threshold_s, file).start()
