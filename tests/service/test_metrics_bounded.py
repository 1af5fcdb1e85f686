"""Bounded /metrics: 10,000 requests to distinct paths no route serves (GET, POST, PUT, DELETE), and
distinct model names in a templated route, leave /metrics the same size (±1 %) and the server's
RSS grown by less than 5 MiB. Before service/metrics_labels.py each distinct path added ~20 series.
"""
from __future__ import annotations

import asyncio

import httpx

from service.launcher import rss_mib

METHODS = ("GET", "POST", "PUT", "DELETE")
N = 10_000


async def _distinct_paths(url: str, start: int, n: int, clients: int = 8) -> set[int]:
    statuses: set[int] = set()

    async def client(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for i in range(start + k, start + n, clients):
                path = f"/no-such-{i}/x{i}" if i % 5 else f"/v2/models/nosuch{i}/ready"
                statuses.add((await c.request(METHODS[i % len(METHODS)], path)).status_code)

    await asyncio.gather(*(client(k) for k in range(clients)))
    return statuses


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def test_unknown_paths_do_not_grow_metrics_or_memory(server) -> None:
    asyncio.run(_distinct_paths(server.url, 0, 1000))  # every status and label seen once; allocator warm
    before, rss_before = _metrics(server.url), rss_mib(server.pids())
    statuses = asyncio.run(_distinct_paths(server.url, 1000, N))
    after, rss_after = _metrics(server.url), rss_mib(server.pids())
    print(f"/metrics {len(before)} -> {len(after)} bytes, {len(before.splitlines())} -> {len(after.splitlines())} "
          f"lines; RSS {rss_before:.1f} -> {rss_after:.1f} MiB after {N} distinct paths")
    assert statuses <= {404, 405}, statuses
    assert len(after.splitlines()) == len(before.splitlines()), "new series appeared"
    assert abs(len(after) - len(before)) <= 0.01 * len(before), (len(before), len(after))
    assert "no-such-" not in after and "nosuch" not in after, "a raw path became a label"
    assert 'endpoint="unmatched"' in after and 'endpoint="/v2/models/{name}/ready"' in after
    assert rss_after - rss_before < 5, f"RSS grew {rss_after - rss_before:.1f} MiB"
