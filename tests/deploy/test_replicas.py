"""Two replicas of the image behind HAProxy (deploy.replicas, what `make replicas N=2` starts):
answers pass through unchanged, an overloaded replica's 503 is passed through and never retried,
kill -9 of a replica's server costs no request and the restarted replica rejoins, and a rolling
model update v1 -> v2 -> v1 under load answers every request 200 with the right label.

Load: a closed loop of 8 clients posting held-out digits (28 px PNGs, the digits CNN), each
checked against the label the idle service gave it. Figures are printed, not asserted.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, RUNNER, background_load
from deploy.replicas.cluster import Cluster
from deploy.replicas.runners import Replica, get_runner, podman
from service.launcher import http_status
from loadtests.soak import bad_cases, check, fire, good_cases, open_loop, split_url

MAX_QUEUE = 16  # images admitted per replica: the 8-client loop never reaches it, the overload burst does
REJOIN_BOUND_S = 180.0


@pytest.fixture(scope="module")
def cluster(digits_versions, replica_image, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("replicas"), runner=RUNNER, image=replica_image)
    try:
        c.up(2, {"IMGSERVE_THREADS": "1", "IMGSERVE_MAX_QUEUE": str(MAX_QUEUE)}, digits_versions["v1"], port=0)
        yield c
    finally:
        print("\n" + c.describe() if c.haproxy_pid else "")
        c.down()


@pytest.fixture(scope="module")
def cases(cluster):
    return good_cases(cluster.url, n=16, side=28)


def make_from(cases):
    return lambda i: (cases[i % len(cases)].request, cases[i % len(cases)])


def send(url: str, request: bytes):
    host, port = split_url(url)
    return asyncio.run(fire(host, port, request, 30.0))


def backend_counter(cluster: Cluster, field: str) -> int:
    return int(cluster.haproxy.stats()["BACKEND"][field] or 0)  # the backend's own row


def metric_sum(url: str, name: str, labels: str) -> float:
    from urllib.request import urlopen

    text = urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*{labels}[^}}]*}} ([0-9.e+]+)$", text, re.M))


def test_answers_pass_through_unchanged(cluster, cases) -> None:
    """Good and bad inputs get byte-identical answers through HAProxy and from a replica directly."""
    direct = next(iter(cluster.replicas().values())).url
    bad = bad_cases(good_png=cases[0].request.split(b"\r\n\r\n", 2)[2].split(b"\r\n--")[0])
    assert len(bad) >= 4
    for case in [cases[0], *bad]:
        via, own = send(cluster.url, case.request), send(direct, case.request)
        assert via.status == own.status == case.status, (case.name, via.status, own.status, via.body[:200])
        assert via.body == own.body, (case.name, via.body[:200], own.body[:200])
        assert via.headers.get("content-type") == own.headers.get("content-type")
    # The metric the in-flight HPA scales on (deploy/k8s/prometheus-adapter/rules.yaml) is really exported.
    assert metric_sum(direct, "bentoml_service_request_in_progress", 'endpoint="/classify"') >= 0
    assert http_status(cluster.url + "/readyz") == 200


def test_overload_503_is_passed_through_not_retried(cluster) -> None:
    """Far more concurrent uploads than both replicas admit: the replicas shed with 503 + Retry-After,
    HAProxy hands each 503 to its client as is and retries none (no storm): every 503 a client got
    is one a replica counted, once."""
    big = good_cases(cluster.url, n=8, side=1024)
    replicas = [r.url for r in cluster.replicas().values()]
    shed_before = sum(metric_sum(u, "imgserve_errors_total", 'kind="overloaded"') for u in replicas)
    retries_before, redispatch_before = backend_counter(cluster, "wretr"), backend_counter(cluster, "wredis")
    host, port = split_url(cluster.url)
    rs = asyncio.run(open_loop(host, port, make_from(big), rate=400.0, seconds=2.0, timeout=60.0))
    shed_after = sum(metric_sum(u, "imgserve_errors_total", 'kind="overloaded"') for u in replicas)
    verdicts = Counter(check(r.tag, r) if r.tag is not None else "client backlog" for r in rs)
    got_503 = [r for r in rs if r.status == 503]
    retries = backend_counter(cluster, "wretr") - retries_before
    print(f"\noverload: {len(rs)} requests in 2 s -> {dict(verdicts)}; replicas counted "
          f"{shed_after - shed_before:.0f} refusals; HAProxy retries {retries}, redispatches "
          f"{backend_counter(cluster, 'wredis') - redispatch_before}")
    assert set(verdicts) <= {"", "shed"}, dict(verdicts)
    assert got_503, "the burst did not overload the replicas: nothing to check"
    assert len(got_503) == shed_after - shed_before, "a client 503 that no replica sent, or a refusal retried"
    assert retries == 0, f"HAProxy retried {retries} requests"
    for r in got_503:
        assert int(r.headers["retry-after"]) >= 1 and "overloaded" in r.json()["error"], r.body[:200]
    # Shedding is not sticky: at once, answers are 200 again.
    after = asyncio.run(open_loop(host, port, make_from(big), rate=5.0, seconds=1.0, timeout=30.0))
    assert [check(r.tag, r) for r in after] == [""] * len(after)


def test_kill9_of_a_replica_costs_no_request_and_it_rejoins(cluster, cases) -> None:
    slot, victim = sorted(cluster.replicas().items())[0]
    runner = get_runner(cluster.runner)
    pid = runner.server_pid(victim)
    restarts = runner.restarts(victim)
    retries_before = backend_counter(cluster, "wretr")
    hap = cluster.haproxy
    served_before = int(hap.stats()[f"r{slot}"]["stot"])
    with background_load(cluster.url, make_from(cases)) as results:
        time.sleep(2.0)
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        if cluster.runner == "process":  # no supervisor restarts a plain process: play the kubelet
            _restart_process(cluster, slot, victim)
        down_after = hap.wait_status(slot, "DOWN", 30)
        up_after = hap.wait_status(slot, "UP", REJOIN_BOUND_S)
        t_up = time.monotonic()
        served_at_rejoin = int(hap.stats()[f"r{slot}"]["stot"])
        time.sleep(3.0)
        served_after = int(hap.stats()[f"r{slot}"]["stot"]) - served_at_rejoin
    verdicts = Counter(check(r.tag, r) or "ok" for r in results)
    retries = backend_counter(cluster, "wretr") - retries_before
    print(f"\nkill -9 of r{slot}'s server (pid {pid}): HAProxy marked it DOWN after {down_after:.1f} s, "
          f"UP again {up_after:.1f} s later ({time.monotonic() - t_up:.1f} s of load after); {len(results)} requests: "
          f"{dict(verdicts)}; HAProxy retried {retries}; r{slot} served {served_after} after rejoining "
          f"(served {served_before} before the kill)")
    assert verdicts == Counter({"ok": len(results)}), dict(verdicts)
    assert served_after > 0, "the restarted replica did not take traffic again"
    if cluster.runner == "podman":
        assert runner.restarts(victim) == restarts + 1, "podman did not restart the container"
        assert runner.server_pid(victim) != pid


def _restart_process(cluster: Cluster, slot: int, victim: Replica) -> None:
    """Process runner only: stop what is left of the killed replica and start it again on its port."""
    from deploy.replicas.runners import process_start

    get_runner("process").stop(victim, 5)
    r = process_start("", victim.port, victim.env, None, Path(victim.log).parent)
    cluster.slots[slot] = r.to_json()
    cluster.save()


@pytest.mark.parametrize("order", [("v1", "v2"), ("v2", "v1")], ids=["roll-v2", "roll-back-v1"])
def test_rolling_update_under_load(cluster, cases, digits_versions, order) -> None:
    old, new = order
    served = {r.port: r.models for r in cluster.replicas().values()}
    old_refs = [r.ref for r in cluster.replicas().values()]
    assert all(m.endswith(f"digits-{old}") for m in served.values()), served
    retries_before = backend_counter(cluster, "wretr")
    t0 = time.monotonic()
    with background_load(cluster.url, make_from(cases)) as results:
        cluster.roll({"IMGSERVE_THREADS": "1", "IMGSERVE_MAX_QUEUE": str(MAX_QUEUE)}, digits_versions[new])
        took = time.monotonic() - t0
        time.sleep(1.0)
    verdicts = Counter(check(r.tag, r) or "ok" for r in results)
    versions = Counter(r.json().get("version") for r in results if r.status == 200)
    retries = backend_counter(cluster, "wretr") - retries_before
    after = [send(cluster.url, cases[i % len(cases)].request) for i in range(20)]
    print(f"\nroll {old} -> {new} under load: {took:.1f} s, {len(results)} requests: {dict(verdicts)}, "
          f"versions {dict(versions)}; HAProxy retries {retries}")
    assert verdicts == Counter({"ok": len(results)}), dict(verdicts)
    assert set(versions) == {old, new}, f"both versions answer during the roll: {dict(versions)}"
    # Nothing was cut: a replica stopped with requests in flight would show up as HAProxy retries.
    assert retries == 0, f"{retries} requests had to be retried: a replica stopped before it was drained"
    assert [r.json()["version"] for r in after] == [new] * 20
    assert {r.port for r in cluster.replicas().values()}.isdisjoint(served), "every replica was replaced"
    if cluster.runner == "podman":  # the old containers are stopped and removed, the new ones run
        running = _podman_ids("ps")
        assert all(r.ref in running for r in cluster.replicas().values())
        assert not any(ref in _podman_ids("ps", "-a") for ref in old_refs)


def _podman_ids(*cmd: str) -> str:
    return podman().run(*cmd, "-q", "--no-trunc", timeout=60).stdout


def test_k8s_manifest_matches_the_image(replica_image) -> None:
    """What deploy/k8s assumes about the image is what the image is: its user, its port, the preStop
    command it can run, and a BentoML home on the writable volume."""
    from deploy.k8s_render import render

    if RUNNER != "podman":
        pytest.skip("needs the image")
    (dep,) = [d for d in render(ROOT / "deploy/k8s/overlays/baked") if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    engine = podman()
    config = json.loads(engine.run("image", "inspect", replica_image).stdout)[0]["Config"]
    uid = engine.run("run", "--rm", "--no-healthcheck", "--entrypoint", "id", replica_image, "-u").stdout.strip()
    assert int(uid) == pod["securityContext"]["runAsUser"], f"image user uid {uid}"
    assert [f"{p['containerPort']}/tcp" for p in c["ports"]] == list(config["ExposedPorts"])
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    ran = engine.run("run", "--rm", "--no-healthcheck", "--read-only", "--entrypoint", pre[0], replica_image, "0",
                     check=False)
    assert ran.returncode == 0, f"the image cannot run the preStop command {pre}: {ran.stderr[-300:]}"
