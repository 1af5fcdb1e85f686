"""What rollouts cost (docs/rollouts.md): memory per extra version, and live latency with the shadow on.

    .venv/bin/python -m loadtests.rollout_cost --bundle DIR --image PNG --clients 1,8 --secs 10 --rounds 3

1. Memory: one ``bentoml serve`` with version v1 of the bundle; RSS of its processes (supervisor +
   worker) after one request, then after loading v2 and v3 of the same bundle beside it through the
   repository API (``parameters.version``): the cost per extra version against the model file.
2. Shadow: on the same server, closed-loop /classify clients for ``--secs`` at each client count,
   alternating shadow off (``weights {v1: 100}``) and shadow 100 % on v2, ``--rounds`` times
   (interleaved, so the machine's load falls on both alike): live p50/p99, req/s, and how many
   shadow runs compared or were shed. Load average before and after.
Prints one JSON document at the end.
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from service import launcher

KEY = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "m"


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def _classify(c: httpx.Client, image: bytes, **fields) -> httpx.Response:
    r = c.post("/classify", files={"image": ("i.png", image, "image/png")}, data=fields)
    r.raise_for_status()
    return r


def memory(srv: launcher.Server, c: httpx.Client, bundle: Path, image: bytes) -> dict:
    _classify(c, image, version="v1")
    rss = [launcher.rss_mib(srv.pids())]
    for v in ("v2", "v3"):
        r = c.post(f"/v2/repository/models/{NAME}/load", json={"parameters": {"bundle": str(bundle), "version": v}},
                   timeout=300)
        r.raise_for_status()
        _classify(c, image, version=v)
        rss.append(launcher.rss_mib(srv.pids()))
    c.post(f"/v2/repository/models/{NAME}/unload", json={"parameters": {"version": "v3"}}).raise_for_status()
    per = (rss[2] - rss[0]) / 2
    size = (bundle / "model.onnx").stat().st_size / 2**20
    return {"rss_mib": [round(x, 1) for x in rss], "per_extra_version_mib": round(per, 1),
            "model_file_mib": round(size, 2), "ratio": round(per / size, 2)}


def closed_loop(url: str, image: bytes, clients: int, secs: float, failed: list | None = None) -> list[float]:
    """Latencies of the 2xx answers; the status of every other answer goes to ``failed``."""
    lat: list[float] = []
    failed = [] if failed is None else failed
    lock = threading.Lock()
    end = time.monotonic() + secs

    def run() -> None:
        mine, bad = [], []
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                r = c.post("/classify", files={"image": ("i.png", image, "image/png")})
                (mine.append(time.perf_counter() - t0) if r.is_success else bad.append(r.status_code))
        with lock:
            lat.extend(mine)
            failed.extend(bad)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


def _shadow_counts(c: httpx.Client) -> tuple[int, int]:
    rows = c.get("/models").json()["traffic"][NAME]["shadow_stats"]
    return sum(r["compared"] for r in rows), sum(r["shed"] for r in rows)


POLICIES = {"off": {NAME: {"weights": {"v1": 100, "v2": 0}}},
            "shadow": {NAME: {"weights": {"v1": 100, "v2": 0}, "shadow": {"version": "v2", "fraction": 1.0}}}}


def shadow_cost(srv: launcher.Server, c: httpx.Client, image: bytes, clients: list[int], secs: float,
                rounds: int) -> list[dict]:
    rows = []
    for n in clients:
        closed_loop(srv.url, image, n, 2)  # warm-up at this concurrency
        for r in range(rounds):
            for mode in ("off", "shadow") if r % 2 == 0 else ("shadow", "off"):
                c.put("/v2/repository/traffic", content=json.dumps(POLICIES[mode])).raise_for_status()
                before = _shadow_counts(c)
                load = _loadavg()
                failed: list[int] = []
                lat = sorted(closed_loop(srv.url, image, n, secs, failed))
                time.sleep(0.2)  # the last shadow runs land
                after = _shadow_counts(c)
                rows.append({"clients": n, "round": r, "mode": mode, "requests": len(lat), "non2xx": len(failed),
                             "req_s": round(len(lat) / secs, 1), "p50_ms": round(1000 * lat[len(lat) // 2], 2),
                             "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2),
                             "shadow_compared": after[0] - before[0], "shadow_shed": after[1] - before[1],
                             "load_before": load, "load_after": _loadavg()})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per client count: the median over rounds of each mode's p99, and the shadow's share of it."""
    out = []
    for n in sorted({r["clients"] for r in rows}):
        med = {m: statistics.median(r["p99_ms"] for r in rows if r["clients"] == n and r["mode"] == m)
               for m in POLICIES}
        reqs = {m: statistics.median(r["req_s"] for r in rows if r["clients"] == n and r["mode"] == m) for m in POLICIES}
        sh = [r for r in rows if r["clients"] == n and r["mode"] == "shadow"]
        done = sum(r["shadow_compared"] for r in sh)
        out.append({"clients": n, "p99_off_ms": med["off"], "p99_shadow_ms": med["shadow"],
                    "p99_change_pct": round(100 * (med["shadow"] / med["off"] - 1), 1),
                    "req_s_off": reqs["off"], "req_s_shadow": reqs["shadow"],
                    "shadow_compared_share": round(done / max(1, sum(r["requests"] for r in sh)), 3),
                    "non2xx": sum(r["non2xx"] for r in rows if r["clients"] == n)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--image", required=True, type=Path, help="an image file the bundle classifies")
    p.add_argument("--clients", default="1,8", help="comma list of closed-loop client counts")
    p.add_argument("--secs", type=float, default=10)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    bundle, image = a.bundle.resolve(), a.image.read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="rollout-cost-"))
    env = {"IMGSERVE_MODELS": f"{NAME}@v1={bundle}", "IMGSERVE_MODEL_CONTROL": "explicit", "IMGSERVE_API_KEY": KEY,
           "IMGSERVE_MODEL_ROOT": str(bundle.parent)}
    srv = launcher.start_service(env, tmp / "serve.log", tmp / "home")
    try:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
            mem = memory(srv, c, bundle, image)
            print(json.dumps({"memory": mem}), flush=True)
            rows = shadow_cost(srv, c, image, [int(x) for x in a.clients.split(",")], a.secs, a.rounds)
    finally:
        srv.stop()
    print(json.dumps({"memory": mem, "shadow": summary(rows), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
