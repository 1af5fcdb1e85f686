"""The stall watchdog (service/stall.py) on a real event loop: a blocked loop gets its stacks dumped
once per stall, naming the blocking line; a loop that keeps running gets nothing."""
from __future__ import annotations

import asyncio
import time

from service import stall


def blocking_handler_for_the_test(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call on the event loop: what the watchdog is for


async def _watched(tmp_path, stalls: list[float], idle_s: float) -> tuple[str, int]:
    out = (tmp_path / "stacks.txt").open("w+")
    dog = stall.watch(0.3, file=out)
    try:
        await asyncio.sleep(idle_s)  # running normally: beats keep coming
        for seconds in stalls:
            blocking_handler_for_the_test(seconds)
            await asyncio.sleep(0.5)
    finally:
        dog.stop()
    out.seek(0)
    return out.read(), dog.stalls


def test_a_blocked_loop_gets_its_stacks_dumped_once_per_stall(tmp_path) -> None:
    text, stalls = asyncio.run(_watched(tmp_path, [1.2, 1.0], idle_s=0.5))
    assert stalls == 2, text
    assert text.count("the event loop has not run for") == 2, text
    assert "blocking_handler_for_the_test" in text and "test_stall_unit.py" in text, text


def test_a_running_loop_gets_nothing(tmp_path) -> None:
    text, stalls = asyncio.run(_watched(tmp_path, [0.1], idle_s=1.5))
    assert stalls == 0 and text == "", text


def test_zero_turns_it_off() -> None:
    async def main():
        return stall.watch(0)
    assert asyncio.run(main()) is None
