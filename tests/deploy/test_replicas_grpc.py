"""OIP over gRPC through the replicas' balancer (deploy.replicas, ``--grpc-port``): HAProxy speaks
HTTP/2 cleartext (h2c) on both sides and balances each call, so one ``tritonclient.grpc`` client on
one channel gets answers from both replicas; each answer equals the one a replica gives directly.
Which replica answered is counted by the replicas themselves (``imgserve_grpc_requests_total``)
and by HAProxy's gRPC backend.
"""
from __future__ import annotations

import re
import time
from urllib.request import urlopen

import numpy as np
import pytest
import tritonclient.grpc as tg

from conftest import RUNNER
from deploy.replicas.cluster import Cluster
from deploy.replicas.haproxy import GRPC_BACKEND

CALLS = 40


@pytest.fixture(scope="module")
def cluster(digits_versions, replica_image, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("replicas-grpc"), runner=RUNNER, image=replica_image)
    try:
        c.up(2, {"IMGSERVE_THREADS": "1"}, digits_versions["v1"], port=0, grpc_port=0)
        yield c
    finally:
        print("\n" + c.describe() if c.haproxy_pid else "")
        c.down()


def _ok_calls(url: str) -> float:
    text = urlopen(url + "/metrics", timeout=10).read().decode()
    m = re.search(r'^imgserve_grpc_requests_total\{code="OK",method="ModelInfer"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_grpc_calls_through_haproxy_reach_both_replicas(cluster) -> None:
    replicas = list(cluster.replicas().values())
    assert all(r.grpc_port for r in replicas) and len({r.grpc_port for r in replicas}) == 2
    own = tg.InferenceServerClient(f"127.0.0.1:{replicas[0].grpc_port}")
    shape = list(own.get_model_metadata("digits").inputs[0].shape[1:])
    pixels = np.random.default_rng(1).integers(0, 256, size=(2, *shape), dtype=np.uint8)
    inp = tg.InferInput("image", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    direct = own.infer("digits", [inp]).as_numpy("logits")

    before = [_ok_calls(r.url) for r in replicas]
    client = tg.InferenceServerClient(cluster.grpc_url)  # one channel, one HTTP/2 connection to HAProxy
    assert client.is_server_ready() and client.is_model_ready("digits")
    for _ in range(CALLS):
        r = client.infer("digits", [inp])
        np.testing.assert_allclose(r.as_numpy("logits"), direct, atol=1e-6)
        assert r.get_response().model_name == "digits"
    served = [_ok_calls(r.url) - b for r, b in zip(replicas, before)]
    print(f"ModelInfer calls answered per replica: {served}")
    assert sum(served) == CALLS and all(n > 0 for n in served), served
    stats = cluster.haproxy.stats(GRPC_BACKEND)
    assert all(int(stats[f"r{slot}"]["stot"] or 0) > 0 for slot in cluster.replicas()), stats
    # health-checked (HTTP /readyz on the replica's HTTP port) and up, not merely assumed up
    deadline = time.monotonic() + 10  # a check every second: the first ones may not have run yet
    while True:
        stats = cluster.haproxy.stats(GRPC_BACKEND)
        checks = {s: (stats[f"r{s}"]["status"], stats[f"r{s}"]["check_status"]) for s in cluster.replicas()}
        if all(st == "UP" and chk == "L7OK" for st, chk in checks.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert all(st == "UP" and chk == "L7OK" for st, chk in checks.values()), checks


def test_a_rolling_step_repoints_the_grpc_slot_too(cluster, digits_versions) -> None:
    """A rolling step points, enables and drains the slot in both backends: after replacing a replica,
    gRPC calls through the balancer reach the new one (its own counter) and none fails."""
    old = min(cluster.replicas())
    new = cluster.replace(old, {"IMGSERVE_THREADS": "1"}, digits_versions["v2"])
    fresh = cluster.replicas()[new]
    client = tg.InferenceServerClient(cluster.grpc_url)
    shape = list(client.get_model_metadata("digits").inputs[0].shape[1:])
    inp = tg.InferInput("image", [1, *shape], "UINT8")
    inp.set_data_from_numpy(np.zeros((1, *shape), np.uint8))
    versions = {client.infer("digits", [inp]).get_response().model_version for _ in range(CALLS)}
    assert versions == {"v1", "v2"}, versions  # both the remaining old replica and the new one answered
    assert _ok_calls(fresh.url) > 0
    assert cluster.haproxy.stats(GRPC_BACKEND)[f"r{old}"]["status"].startswith("MAINT")
