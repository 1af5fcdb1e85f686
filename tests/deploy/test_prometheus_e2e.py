"""A real Prometheus (Debian's package) scraping a real `bentoml serve` on the loopback, with the real
rule file (deploy/monitoring/rules.yml; only the alerts' `for:` shortened, by deploy.monitoring.local).

In order, on one server and one Prometheus:
1. in-distribution digits (the validation split) for PHASE_S seconds: no alert is pending or firing
   at any moment, and the drift score is published and under the threshold (the false-positive check);
2. the same images inverted, for at most PHASE_S seconds: ImgserveDriftHigh fires; the requests and
   seconds from the shift to firing are printed (docs/monitoring.md quotes them);
3. every query of the Grafana dashboard (deploy/monitoring/grafana-dashboard.json) succeeds and
   returns data;
4. the server stopped: ImgserveDown fires.
"""
from __future__ import annotations

import io
import json
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageOps

from deploy.monitoring.local import prometheus
from service.launcher import start_service

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
ALERT_FOR = "3s"      # every alert's `for:` in this test (the file's are minutes)
PHASE_S = 15.0        # in-distribution phase; the shifted one must fire within the same time
CLIENTS = 4
# A window of 400 predictions (published from 400 on): in-distribution PSI stays well under 0.25.
DRIFT_ENV = {"IMGSERVE_DRIFT_WINDOW": "400", "IMGSERVE_DRIFT_MIN_SAMPLES": "400"}

pytestmark = pytest.mark.slow


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference_bundle(trained_digits_run, tmp_path_factory) -> Path:
    """The digits model with its reference statistics on the whole test split (about 270 images)."""
    from export import export_bundle

    return export_bundle(trained_digits_run / "best.pt", tmp_path_factory.mktemp("refbundle") / "digits",
                         name="digits", version="1", samples=270)


@pytest.fixture(scope="module")
def images() -> dict[str, list[bytes]]:
    """The validation split (never seen by export's reference) as PNGs, as is and inverted."""
    from training.datasets import get_dataset

    val = get_dataset("digits").val
    pil = [val[i][0].convert("L") for i in range(len(val))]
    return {"in_distribution": [png(i) for i in pil], "inverted": [png(ImageOps.invert(i)) for i in pil]}


@pytest.fixture(scope="module")
def server(reference_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-prom")
    srv = start_service({"IMGSERVE_MODELS": str(reference_bundle), **DRIFT_ENV}, tmp / "serve.log", tmp / "home")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prom(server, tmp_path_factory):
    target = server.url.removeprefix("http://")
    p = prometheus(tmp_path_factory.mktemp("prometheus"), [target], scrape_s=1, eval_s=1, alert_for=ALERT_FOR).start()
    try:
        p.wait_ready("/-/ready", timeout_s=60)
        wait_for(lambda: query(p.url, 'up{job="imgserve"} == 1'), 20, "Prometheus never scraped the service")
        # Prometheus starts scraping a few seconds after its rules (target updates are throttled to
        # 5 s), so ImgserveAbsent is active at first; it resolves on the first evaluation after that.
        wait_for(lambda: not active_alerts(p.url), 10, "alerts still active once the service is scraped")
        yield p
    finally:
        p.stop()


def api(url: str, path: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def query(url: str, expr: str) -> list[dict]:
    return api(url, "query", query=expr)["result"]


def active_alerts(url: str) -> list[dict]:
    """Alerts pending or firing now."""
    return api(url, "alerts")["alerts"]


def wait_for(check, timeout_s: float, message: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.25)
    pytest.fail(message)


class Load:
    """CLIENTS threads posting the bodies round-robin to /classify until stop(); counts the answers."""

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        self.url, self.bodies = url + "/classify", bodies
        self.done = 0
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def _client(self, offset: int) -> None:
        with requests.Session() as s:
            i = offset
            while not self._stop.is_set():
                r = s.post(self.url, files={"image": ("x.png", self.bodies[i % len(self.bodies)], "image/png")}, timeout=30)
                with self._lock:
                    self.done += 1
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                i += CLIENTS

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def drift_psi(url: str) -> dict[str, float]:
    return {r["metric"]["signal"]: float(r["value"][1])
            for r in query(url, 'imgserve_drift_score{job="imgserve", model="digits", metric="psi"}')}


NOT_AN_IMAGE = b"these bytes are not an image"


def test_in_distribution_traffic_fires_no_alert(server, prom, images) -> None:
    """One body in 50 is not an image (a 400, as clients do send): that is no reason to wake anyone."""
    bodies = images["in_distribution"]
    bodies = [b for i in range(0, len(bodies), 49) for b in (*bodies[i:i + 49], NOT_AN_IMAGE)]
    seen: list[dict] = []
    with Load(server.url, bodies) as load:
        t0 = time.monotonic()
        while time.monotonic() - t0 < PHASE_S:
            seen += active_alerts(prom.url)
            time.sleep(0.25)
        psi = drift_psi(prom.url)
    print(f"\nin-distribution: {load.done} requests in {PHASE_S:.0f} s, statuses {load.statuses}, drift PSI {psi}")
    assert load.statuses.keys() == {200, 400}, load.statuses
    assert not seen, f"alerts during in-distribution traffic: {seen[:3]}"
    assert set(psi) >= {"class_mix", "confidence"}, f"the drift score is not published: {psi}"
    assert max(psi.values()) < 0.25, psi


def test_shifted_inputs_fire_the_drift_alert(server, prom, images) -> None:
    firing: list[dict] = []
    pending_at = None
    with Load(server.url, images["inverted"]) as load:
        t0 = time.monotonic()
        while time.monotonic() - t0 < PHASE_S and not firing:
            alerts = [a for a in active_alerts(prom.url) if a["labels"]["alertname"] == "ImgserveDriftHigh"]
            if alerts and pending_at is None:
                pending_at = (time.monotonic() - t0, load.done)
            firing = [a for a in alerts if a["state"] == "firing"]
            if not firing:
                time.sleep(0.1)
        fired_at = (time.monotonic() - t0, load.done)
    print(f"\nshifted (inverted): threshold crossed (pending) after {pending_at}, firing after {fired_at} "
          f"(seconds, requests; `for` {ALERT_FOR}, scrape and evaluation 1 s); statuses {load.statuses}; "
          f"firing: {[(a['labels']['signal'], a['value']) for a in firing]}")
    assert firing, f"ImgserveDriftHigh did not fire within {PHASE_S} s of inverted inputs ({load.done} requests)"
    labels = firing[0]["labels"]
    assert (labels["model"], labels["version"], labels["severity"]) == ("digits", "1", "warning"), labels
    assert float(firing[0]["value"]) > 0.25


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target; Grafana's variables as it sends them with 'All'."""
    dash = json.loads(DASHBOARD.read_text())
    values = {"$__rate_interval": "1m", "$job": ".*", "$model": ".*"}
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in values.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{panel['title']}: a variable this test does not know: {expr}"
            out.append((panel["title"], expr))
    return out


def test_every_dashboard_query_succeeds_with_data(prom) -> None:
    """Every query succeeds (api() checks the status) and returns data after the traffic above."""
    queries = dashboard_queries()
    assert len(queries) >= 15
    empty = [(title, expr) for title, expr in queries if not query(prom.url, expr)]
    assert not empty, f"panels whose query returns nothing after the traffic above: {empty}"


def test_a_stopped_service_fires_down(server, prom) -> None:
    server.stop()
    firing = wait_for(lambda: [a for a in active_alerts(prom.url)
                               if a["labels"]["alertname"] == "ImgserveDown" and a["state"] == "firing"], 20,
                      "ImgserveDown did not fire within 20 s of the server stopping")
    assert firing[0]["labels"]["instance"] == server.url.removeprefix("http://")
