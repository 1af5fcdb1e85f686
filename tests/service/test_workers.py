"""Several worker processes (IMGSERVE_WORKERS=2) against a real ``bentoml serve``: every request gets
its own right answer whichever process takes it, /metrics adds up the processes exactly (BentoML's
Prometheus multiprocess mode), the service-wide IMGSERVE_MAX_QUEUE is split between the workers,
and a killed worker is replaced while the other keeps answering."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.launcher import start_service, tree_pids
from svc_factory import digit_uploads, established_on, png_bytes

N_IMAGES, REPEATS = 8, 6
MAX_QUEUE = 64  # 32 images in flight per worker


@pytest.fixture(scope="module")
def two_workers(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-workers")
    env = {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_WORKERS": "2", "IMGSERVE_MAX_QUEUE": str(MAX_QUEUE)}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def images(bundle) -> tuple[list[bytes], list[int]]:
    """PNG uploads and the top-1 class of each, from the bundle's model run in-process on the
    service's own preprocessing."""
    import json

    import onnxruntime as ort

    from imgformat.preprocess import Preprocessor

    imgs, _ = digit_uploads(N_IMAGES)
    data = [png_bytes(im) for im in imgs]
    pre = Preprocessor.from_manifest(json.loads((bundle / "manifest.json").read_text())["preprocessing"],
                                     max_pixels=10**7)
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: np.stack([pre(d) for d in data])})[0]
    return data, [int(i) for i in logits.argmax(1)]


def worker_pids(srv) -> list[int]:
    return [p for p in tree_pids(srv.pid) if p != srv.pid and _cmdline(p).find(b"_bentoml_impl.worker") >= 0]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def classify(url: str, data: bytes) -> httpx.Response:
    # A new connection per request: the kernel hands each to whichever worker accepts it.
    return httpx.post(url + "/classify", files={"image": ("x.png", data, "image/png")}, data={"top_k": "1"},
                      timeout=30, headers={"Connection": "close"})


def counts(url: str) -> tuple[float, float]:
    """(images preprocessed, 200 answers of /classify) as /metrics reports them for the whole service."""
    text = httpx.get(url + "/metrics", timeout=10).text
    pre = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("imgserve_preprocess_seconds_count"))
    ok = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("bentoml_service_request_total{") and 'endpoint="/classify"' in line
             and 'http_response_code="200"' in line)
    return pre, ok


def send_all(url: str, images) -> None:
    data, top1 = images
    jobs = [i % N_IMAGES for i in range(N_IMAGES * REPEATS)]
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda i: (i, classify(url, data[i])), jobs))
    for i, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["index"] == top1[i], f"image {i} got another image's answer: {r.text}"


def test_two_workers_answer_and_metrics_add_up(two_workers, images) -> None:
    assert len(worker_pids(two_workers)) == 2
    send_all(two_workers.url, images)
    n = N_IMAGES * REPEATS
    for _ in range(4):  # each scrape may be answered by either worker: all must see the sum
        assert counts(two_workers.url) == (n, n)


def test_max_queue_is_split_between_workers(two_workers, images) -> None:
    """A batch over a worker's share can never be served (every worker has the same share): 413 at
    once, no Retry-After; a batch of exactly its share is served."""
    data, _ = images

    def batch(n: int) -> httpx.Response:
        files = [("images", (f"{i}.png", data[i % N_IMAGES], "image/png")) for i in range(n)]
        return httpx.post(two_workers.url + "/classify_batch", files=files, timeout=30)

    share = MAX_QUEUE // 2
    r = batch(share + 1)
    assert r.status_code == 413 and "Retry-After" not in r.headers and "IMGSERVE_MAX_QUEUE" in r.text, r.text
    assert batch(share).status_code == 200


def test_killed_worker_is_replaced_while_the_other_answers(two_workers, images) -> None:
    before = counts(two_workers.url)
    port = int(two_workers.url.rsplit(":", 1)[1])
    victim = worker_pids(two_workers)[0]
    os.kill(victim, signal.SIGKILL)
    send_all(two_workers.url, images)  # the survivor takes every new connection meanwhile
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = worker_pids(two_workers)
        # /readyz may be answered by the survivor: the replacement serves once it listens on its own socket
        if (len(pids) == 2 and victim not in pids and all(_listening_inodes(pid, port) for pid in pids)
                and httpx.get(two_workers.url + "/readyz", timeout=5).status_code == 200):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replacement worker 120 s after kill -9 of {victim}: workers {worker_pids(two_workers)}")
    send_all(two_workers.url, images)
    n = N_IMAGES * REPEATS
    # The dead worker's counts stay in the sum (its metric files outlive it).
    assert counts(two_workers.url) == (before[0] + 2 * n, before[1] + 2 * n)


def test_each_worker_listens_on_its_own_socket_and_connections_spread(two_workers) -> None:
    """One shared listening socket let whichever worker woke first take a burst of keep-alive
    connections (62 of 64 seen); one SO_REUSEPORT socket per worker spreads them by address hash."""
    import socket

    port = int(two_workers.url.rsplit(":", 1)[1])
    pids = worker_pids(two_workers)
    listening = {pid: _listening_inodes(pid, port) for pid in pids}
    assert all(listening.values()), f"a worker without a listening socket on {port}: {listening}"
    assert len(set().union(*listening.values())) == len(pids), f"workers share a listening socket: {listening}"

    conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(64)]
    try:
        for c in conns:  # an answer on each: every connection has been accepted by some worker
            c.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        for c in conns:
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        per_worker = {pid: established_on(pid, port) for pid in pids}
    finally:
        for c in conns:
            c.close()
    assert sum(per_worker.values()) == 64, per_worker
    # Binomial(64, 1/2) falls under 16 with probability ~1e-4; the shared socket did 58:6 and 64:0.
    assert min(per_worker.values()) >= 16, f"connections per worker: {per_worker}"


def _listening_inodes(pid: int, port: int) -> set[int]:
    import psutil

    try:
        return {_inode(pid, c.fd) for c in psutil.Process(pid).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    except (psutil.NoSuchProcess, OSError):  # a worker exiting, or a descriptor closed meanwhile
        return set()


def _inode(pid: int, fd: int) -> int:
    return int(os.readlink(f"/proc/{pid}/fd/{fd}").split("[")[1].rstrip("]"))
