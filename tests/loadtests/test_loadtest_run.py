"""A real, tiny locust run (2 users, 5 s) against a real `bentoml serve` of a real digits bundle.

Checks the runner end to end: the service is started on a free loopback port and stopped by PID,
locust writes its CSV and HTML, the summary parser reads them, and every body passed its checks.
No timing is asserted.
"""
from __future__ import annotations

import json
import shutil

import pytest



@pytest.fixture(scope="module")
def digits_bundle(trained_digits_run, tmp_path_factory):
    from export import export_bundle

    out = tmp_path_factory.mktemp("lt_bundles") / "digits"
    return export_bundle(trained_digits_run / "best.pt", out, name="digits", version="1", samples=16)


def test_tiny_locust_run_against_the_service(digits_bundle, tmp_path):
    from loadtests import run
    from service import launcher

    out = tmp_path / "run"
    code = run.main(["--start-service", str(digits_bundle), "--users", "2", "--duration", "5s",
                     "--max-requests", "400", "--out", str(out), "--ready-timeout", "120"])
    log_tail = launcher.tail(out / "locust.log", 30)
    assert (out / "locust_stats.csv").exists() and (out / "report.html").exists(), log_tail
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["requests"] > 0, log_tail
    assert summary["failures_by_kind"] == {}, f"failures: {summary['failures_by_kind']}\n{log_tail}"
    assert code == 0
    assert summary["total"]["requests"] <= 400 + 10, "--max-requests bounds the run (give or take the requests in flight)"
    from loadtests.summary import summarize
    from_csv = summarize(out / "locust")   # locust's own CSV (a snapshot up to a second old) parses too
    assert 0 <= from_csv.total.requests <= summary["total"]["requests"]
    names = {r["name"] for r in summary["rows"]}
    assert any("bad" in n for n in names) or summary["total"]["requests"] < 50, names
    assert "service: models ['digits']" in (out / "locust.log").read_text(), log_tail


def test_wrk_output_parser_on_a_real_run(tmp_path):
    """wrk is a system tool (Debian's); parse a real 1 s run against a local static server."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk)")
    import http.server
    import threading

    from loadtests import bench
    from service import launcher

    port = launcher.free_port()
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), lambda *a: handler(*a, directory=str(tmp_path)))
    (tmp_path / "ok.txt").write_text("ok")
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        out = bench.run_wrk(f"http://127.0.0.1:{port}/ok.txt", 2, 1, {}, method="GET")
        missing = bench.run_wrk(f"http://127.0.0.1:{port}/missing", 2, 1, {}, method="GET")
    finally:
        srv.shutdown()
    r, m = bench.parse_wrk(out, 2), bench.parse_wrk(missing, 2)
    assert r.requests > 0 and r.ok == r.requests and r.p50_ms is not None, out
    assert m.requests > 0 and m.ok == 0 and m.statuses.get("404") == m.requests, missing


def test_batch_stats_from_prometheus_text():
    from loadtests.bench import batch_stats

    def text(b1, b2, b4, inf, s, n):
        return "\n".join([f'imgserve_batch_size_bucket{{le="1.0",model="m"}} {b1}',
                          f'imgserve_batch_size_bucket{{le="2.0",model="m"}} {b2}',
                          f'imgserve_batch_size_bucket{{le="4.0",model="m"}} {b4}',
                          f'imgserve_batch_size_bucket{{le="+Inf",model="m"}} {inf}',
                          f'imgserve_batch_size_sum{{model="m"}} {s}', f'imgserve_batch_size_count{{model="m"}} {n}'])
    st = batch_stats(text(5, 5, 5, 5, 5, 5), text(7, 9, 10, 10, 5 + 2 + 4 * 2 + 3 * 1, 10))
    assert st["batches"] == 5 and abs(st["mean"] - 13 / 5) < 1e-9, st
    assert st["share_batches_1"] == 2 / 5 and st["share_batches_2"] == 2 / 5 and st["share_batches_3-4"] == 1 / 5, st


def test_floor_service_answers_like_the_service_without_a_model(tmp_path):
    """The benchmark's trivial endpoint: the service's form handling, then a fixed answer."""
    import urllib.request

    from loadtests import bench
    from loadtests.floor_service import ANSWER
    from service import launcher
    from loadtests.payloads import digit_pngs, multipart

    png = digit_pngs(1)[0]
    body, ctype = multipart({"top_k": "5"}, [("image", (png.filename, png.data, "image/png"))])
    server = bench.floor_server(launcher.free_port(), tmp_path / "floor.log")
    with server.start():
        server.wait_ready(timeout_s=120)
        req = urllib.request.Request(server.url + "/classify", data=body, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read()) == ANSWER
        pids = server.pids()
        assert pids, "the floor server runs in its own processes, stopped by PID"
    assert not [p for p in pids if launcher._alive(p)], "stopped with everything it started"
