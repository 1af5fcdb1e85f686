"""Malformed requests found by fuzzing, against a real `bentoml serve` with the default 20 MB body
limit: each gets its 4xx JSON answer, fast, and the health probe never stalls meanwhile.

Every answer, whichever path made it (BentoML, the lean route, OIP, the repository, the guard),
carries X-Request-ID, and a refusal for overload keeps its Retry-After (tests/service/test_oip.py).
"""
from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import time

import httpx
import pytest

from rel_corpus import digit, encode
from rel_server import AUTH
from loadtests.soak import closed_loop, pct, raw_post, split_url

INFER = "/v2/models/digits/infer"
TWO_MILLION = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2_000_000],
                                      "data": ["AA=="] * 2_000_000}]}).encode()
DEEP_DATA = (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": '
             + b"[" * 5000 + b"1" + b"]" * 5000 + b"}]}")
BINARY_HEAD = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2_000_000],
                                      "parameters": {"binary_data_size": 8_000_000}}]}).encode()

# name -> (path, body, extra headers, expected status)
CASES = {
    "json_5000_deep": (INFER, b"[" * 5000, {}, 400),
    "data_5000_deep": (INFER, DEEP_DATA, {}, 400),
    "header_length_5000_digits": (INFER, b"{}", {"Inference-Header-Content-Length": "9" * 5000}, 400),
    "bytes_2M_elements_json": (INFER, TWO_MILLION, {}, 413),
    "bytes_2M_elements_binary": (INFER, BINARY_HEAD + b"\0" * 8_000_000,
                                 {"Inference-Header-Content-Length": str(len(BINARY_HEAD))}, 413),
    "integer_5000_digits": (INFER, b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [' + b"9" * 5000
                            + b'], "data": [1]}]}', {}, 400),
    "shape_rank_1000": (INFER, json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2**30] * 1000,
                                                       "data": [1]}]}).encode(), {}, 400),
    "repository_5000_deep": ("/v2/repository/index", b"[" * 5000, {}, 400),
    "input_name_of_5MB": (INFER, json.dumps({"inputs": [{"name": "n" * 5_000_000, "datatype": "BYTES", "shape": [1],
                                                         "data": ["AA=="]}]}).encode(), {}, 400),
    "repository_load_deep_config": ("/v2/repository/models/x/load", json.dumps(
        {"parameters": {"config": "[" * 5000}}).encode(), {}, 400),
}
FAST_S = 0.5  # an answer before the fix took 2 s; loopback transfer of 16 MB is tens of ms


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_request_is_a_fast_4xx(wide_server, name: str) -> None:
    path, body, headers, status = CASES[name]
    with httpx.Client(timeout=30) as c:
        t0 = time.perf_counter()
        r = c.post(wide_server.url + path, content=body, headers={"content-type": "application/json", **AUTH, **headers})
        took = time.perf_counter() - t0
    assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
    msg = r.json()["error"]
    assert msg and "\n" not in msg and len(msg) <= 500 and "Traceback" not in msg, msg
    assert r.headers.get("x-request-id"), f"{name}: no request id on {dict(r.headers)}"
    assert took < FAST_S, f"{name}: answered in {took:.3f} s"
    print(f"{name}: {r.status_code} in {took * 1000:.1f} ms")


def test_chunked_repository_body_over_the_limit_is_413(wide_server) -> None:
    """No Content-Length: the guard ends the stream at the limit, and the repository says 413."""
    chunks = iter([b'{"ready": "'] + [b"x" * 1_000_000] * 25)
    r = httpx.post(wide_server.url + "/v2/repository/index", content=chunks, headers=AUTH, timeout=30)
    assert r.status_code == 413 and "IMGSERVE_MAX_BODY_BYTES" in r.json()["error"], r.text


def test_every_path_answers_with_a_request_id(wide_server) -> None:
    """BentoML's own routes, the lean route (a 400 from /classify), OIP, the repository and the
    guard's 401; a tame id the client sent comes back as it was, anything else is replaced."""
    png = encode(digit(), "PNG")
    with httpx.Client(base_url=wide_server.url, timeout=30) as c:
        answers = {
            "bentoml_livez": c.get("/livez"),
            "bentoml_405": c.get("/classify", headers=AUTH),
            "lean_200": c.post("/classify", files={"image": ("d.png", png)}, headers=AUTH),
            "lean_400": c.post("/classify", files={"image": ("d.png", b"not an image")}, headers=AUTH),
            "oip_404": c.get("/v2/models/nope", headers=AUTH),
            "oip_infer_200": c.post(INFER, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                             "data": [base64.b64encode(png).decode()]}]},
                                    headers=AUTH),
            "repository_200": c.post("/v2/repository/index", headers=AUTH),
            "guard_401": c.post("/classify", files={"image": ("d.png", png)}),
        }
        for name, r in answers.items():
            assert len(r.headers.get("x-request-id", "")) == 16, f"{name}: {r.status_code} {dict(r.headers)}"
        ids = {r.headers["x-request-id"] for r in answers.values()}
        assert len(ids) == len(answers), "request ids repeat"
        assert c.get("/livez", headers={"X-Request-ID": "trace-42.a"}).headers["x-request-id"] == "trace-42.a"
        odd = c.get("/livez", headers={"X-Request-ID": "x" * 65}).headers["x-request-id"]
        assert odd != "x" * 65 and len(odd) == 16


def _flood(url: str, clients: int, seconds: float, queue: multiprocessing.Queue) -> None:
    """In its own process (its own event loop): ``clients`` clients sending the 2M-element request."""
    host, port = split_url(url)
    req = raw_post(INFER, TWO_MILLION, "application/json", AUTH)
    results = asyncio.run(closed_loop(host, port, lambda i: (req, None), clients, seconds, max_requests=2000))
    queue.put([(r.status, r.latency) for r in results])


def test_health_probe_never_stalls_under_2M_element_requests(wide_server) -> None:
    """8 clients send 2M-element BYTES requests for a few seconds; /livez is probed every 10 ms."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    flood = multiprocessing.get_context("fork").Process(target=_flood, args=(wide_server.url, 8, 4.0, queue))
    probes = []
    flood.start()
    try:
        with httpx.Client(timeout=10) as c:
            time.sleep(0.5)  # the flood is under way
            end = time.perf_counter() + 3.0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                assert c.get(wide_server.url + "/livez").status_code == 200
                probes.append(time.perf_counter() - t0)
                time.sleep(0.01)
        answers = queue.get(timeout=60)
    finally:
        flood.join(timeout=60)
    statuses = {s for s, _ in answers}
    assert statuses == {413}, statuses
    p99, worst = pct(probes, 99), max(probes)
    flood_p50 = pct([lat for _, lat in answers], 50)
    print(f"/livez under 8 x 2M-element requests: {len(probes)} probes, p50 {pct(probes, 50) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms; {len(answers)} floods answered 413, "
          f"p50 {flood_p50 * 1000:.1f} ms")
    # The target is p99 < 50 ms (docs/operations.md has the measured figure); this bound leaves room
    # for a shared CI machine and still fails on a stall like the 1.9 s one before the fix.
    assert p99 < 0.25, f"/livez p99 {p99 * 1000:.0f} ms under the flood"
