"""Payloads for the service tests: held-out test digits saved as 24x24 PNGs, so serving really
decodes and resizes them. The model is the shared ``digits_bundle`` (tests/conftest.py).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

UPLOAD_SIZE = 24


def digit_uploads(n: int | None = None) -> tuple[list[Image.Image], np.ndarray]:
    """Held-out digits as 24x24 "L" PIL images, and their labels."""
    from training.datasets import get_dataset

    ds = get_dataset("digits", seed=0).test
    imgs = [Image.fromarray(a, "L").resize((UPLOAD_SIZE, UPLOAD_SIZE), Image.BILINEAR) for a in ds.images[:n]]
    return imgs, np.asarray(ds.labels[:n])


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def logits_variant(bundle, out, op: str, value, version: str):
    """A copy of ``bundle`` whose logits go through one more ONNX node ``op`` (Mul, Add) with the
    constant ``value``, its hashes rewritten and its manifest version set: another version of the
    same model with an exact, known difference."""
    import hashlib
    import json
    import shutil

    import onnx
    from onnx import helper

    shutil.copytree(bundle, out)
    model = onnx.load(out / "model.onnx")
    g = model.graph
    old = g.output[0].name
    for node in g.node:  # rename the producer's output; the new node produces the graph output
        node.output[:] = [f"{old}_before" if o == old else o for o in node.output]
    g.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), "variant_value"))
    g.node.append(helper.make_node(op, [f"{old}_before", "variant_value"], [old]))
    onnx.save(model, out / "model.onnx")
    m = json.loads((out / "manifest.json").read_text())
    data = (out / "model.onnx").read_bytes()
    m["files"]["model.onnx"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    m["version"] = version
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


def send_together(server, requests: list) -> list:
    """Send ``requests`` (``httpx.Request``), each on its own connection, all written while the
    server's processes are stopped, so they reach its event loop together whatever the machine's
    load (sent from a thread pool they can trickle in one by one on a busy machine, and then no
    batch forms: a CI failure). Their ``httpx.Response``s, in order."""
    import http.client
    from urllib.parse import urlsplit

    import httpx
    import psutil

    url = urlsplit(server.url)
    conns = [http.client.HTTPConnection(url.hostname, url.port, timeout=60) for _ in requests]
    for conn in conns:
        conn.connect()
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    for proc in procs:
        proc.suspend()
    try:
        for conn, req in zip(conns, requests):
            conn.request(req.method, req.url.raw_path.decode(), body=req.read(), headers=dict(req.headers))
    finally:
        for proc in procs:
            proc.resume()
    try:
        answers = [conn.getresponse() for conn in conns]
        return [httpx.Response(a.status, headers=a.getheaders(), content=a.read()) for a in answers]
    finally:
        for conn in conns:
            conn.close()


# -- gRPC (tests/service/test_grpc*.py) ----------------------------------------------------------
def start_grpc_service(env: dict[str, str], tmp):
    """A real ``bentoml serve`` with OIP over gRPC on a free port: the server, with ``grpc_url`` set."""
    from service.launcher import free_port, start_service

    port = free_port()
    srv = start_service({**env, "IMGSERVE_GRPC_PORT": str(port)}, tmp / "serve.log", tmp / "bentoml_home")
    srv.grpc_url = f"127.0.0.1:{port}"
    return srv


def digit_pngs(n: int = 4) -> list[bytes]:
    imgs, _ = digit_uploads(n)
    return [png_bytes(i) for i in imgs]


def triton_bytes_input(files: list[bytes]):
    """tritonclient.grpc's BYTES [N] input of encoded files."""
    import tritonclient.grpc as tg

    inp = tg.InferInput("image", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=np.object_))
    return inp


def established_on(pid: int, port: int) -> int:
    """How many established TCP connections on local ``port`` the process ``pid`` serves (as ``ss -tnp``)."""
    import psutil

    try:
        conns = psutil.Process(pid).net_connections("tcp")
    except psutil.NoSuchProcess:  # a worker that has just exited serves nothing
        return 0
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
