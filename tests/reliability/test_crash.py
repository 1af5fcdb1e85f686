"""kill -9 of the worker that runs the model, under load: BentoML's supervisor starts a new one,
/readyz shows the outage, requests succeed again within a bounded time, no answer is ever wrong.
Prints how many requests failed during the fault and with what."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

from rel_server import API_KEY, AUTH, the_worker
from loadtests.soak import check, closed_loop, good_cases, split_url

RECOVERY_BOUND_S = 120  # generous: a fresh worker imports BentoML and warms the model on a busy box


def readyz(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:  # timeout / refused / reset while no worker accepts
        return type(e).__name__


def outcome(r) -> str:
    return str(r.status) if r.status is not None else r.error


def test_kill9_worker_under_load(api_server) -> None:
    host, port = split_url(api_server.url)
    cases = good_cases(api_server.url, n=16, headers=AUTH)
    make = lambda i: (cases[i % len(cases)].request, cases[i % len(cases)])
    old = the_worker(api_server)
    stop, results = threading.Event(), []
    load = threading.Thread(target=lambda: results.extend(asyncio.run(
        closed_loop(host, port, make, 4, 300.0, max_requests=50_000, timeout=60.0, stop=stop.is_set))))
    load.start()
    try:
        time.sleep(1.5)
        t_kill = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        probes = []
        while time.perf_counter() - t_kill < RECOVERY_BOUND_S:
            probes.append((time.perf_counter() - t_kill, readyz(api_server.url)))
            if probes[-1][1] == 200 and any(p != 200 for _, p in probes):
                break
            time.sleep(0.2)
        t_ready = time.perf_counter()
        time.sleep(2.0)  # keep the load on a little after recovery
    finally:
        stop.set()
        load.join(120)
    down = [p for p in probes if p[1] != 200]
    assert down, f"/readyz never showed the outage: {probes[:10]}"
    assert probes[-1][1] == 200, f"not ready {RECOVERY_BOUND_S} s after the kill: last probes {probes[-5:]}"
    new = the_worker(api_server)
    assert new != old, "the worker was not replaced"

    during = [r for r in results if r.started < t_ready and r.started + r.latency > t_kill]
    after = [r for r in results if r.started >= t_ready + 0.5]
    bad = Counter(check(r.tag, r) for r in results) - Counter({"": len(results)})
    print(f"\nkill -9 of worker {old}: /readyz down {down[0][0]:.1f}..{down[-1][0]:.1f} s after the kill "
          f"({Counter(p for _, p in down)}), ready again after {t_ready - t_kill:.1f} s (worker {new}).\n"
          f"requests overlapping the fault: {len(during)}: {dict(Counter(outcome(r) for r in during))}; "
          f"max latency among them {max((r.latency for r in during), default=0):.1f} s.\n"
          f"after recovery: {len(after)}: {dict(Counter(outcome(r) for r in after))}; "
          f"whole run {len(results)}: {dict(Counter(outcome(r) for r in results))}")
    # Failures may only be the connections the dead worker held (no HTTP answer); every HTTP answer
    # is a correct 200 (or a 503 shed), never a wrong label or a 500.
    assert all(v.startswith("no answer") or v == "shed" for v in bad), dict(bad)
    assert not any(r.error == "timeout" for r in results), "a request hung for 60 s"
    assert after and all(check(r.tag, r) == "" for r in after), Counter(outcome(r) for r in after)
    assert API_KEY not in api_server.log_path.read_text(errors="replace"), "the API key leaked into the log"
