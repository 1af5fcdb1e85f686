"""Benchmark: the Open Inference Protocol against multipart /classify, same service, same run.

    .venv/bin/python -m loadtests.oip_bench --case bundles/m28:fashion --case bundles/r18:china

For each case (BUNDLE:IMAGE, IMAGE as in ``loadtests.bench``: fashion, digit, china, flower or a
file) one ``bentoml serve``, then wrk (``wrk_post.lua``, one prebuilt body) at each concurrency for
each way of asking the same question, "the top 5 classes of this image" (fewer if the model has fewer):
  multipart   POST /classify, the file as form field ``image``, top_k=5
  oip-bytes   POST /v2/models/M/infer, binary tensor data: BYTES [1] (the file), output
              ``probabilities`` with classification 5, returned as binary data
  oip-uint8   the same with UINT8 [1, H, W, C] pixels from the service's own Preprocessor
  oip-json    the file as a base64 BYTES element in plain JSON
  grpc-uint8  OIP over gRPC (IMGSERVE_GRPC_PORT): ModelInfer with the pixels in raw_input_contents,
              driven by h2load (loadtests.grpc_load), the same question and answer as oip-uint8
  grpc-bytes  the same with the file as BYTES [1] in raw_input_contents
  grpc-stream grpc-uint8's message over Triton's ModelStreamInfer: each client sends streams of
              --stream-messages messages at once (several in flight per client; messages/s, and
              p50/p99 of whole streams)
Before measuring, one request of each kind must answer 200 with /classify's top class. ``--rounds N``
first sends the kinds in turn, sequentially, N times (latency with the load drift shared); ``--repeat R``
measures every point R times and prints medians (a shared machine drifts by 10-20 % between points). Prints
ok req/s, p50/p99 and server CPU ms per request (all its processes, /proc) and saves
oip_bench.json in --out.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from service import launcher
from loadtests import grpc_load
from loadtests.bench import _image_bytes, measure_server
from loadtests.payloads import multipart

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
TOP_K = 5
GRPC = "gRPC"  # the "path" of the gRPC kinds: measured with h2load on the gRPC port, not wrk
GRPC_STREAM = "gRPC-stream"  # ... of the streaming kind
GRPC_PATHS = (GRPC, GRPC_STREAM)
STREAM_MESSAGES = 8


def _oip(head: dict, tensor: bytes | None) -> tuple[bytes, dict[str, str]]:
    """(body, wrk env) of an OIP request; binary tensor data when ``tensor`` is given."""
    js = json.dumps(head).encode()
    if tensor is None:
        return js, {"CONTENT_TYPE": "application/json"}
    return js + tensor, {"CONTENT_TYPE": "application/octet-stream", "HEADER_LENGTH": str(len(js))}


def bodies(bundle: Path, image: bytes, filename: str) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """kind -> (path, body, wrk env) for the default model of ``bundle``."""
    from imgformat.bundle import load_bundle
    from service.oip_tensors import join_bytes
    from imgformat.preprocess import Preprocessor

    b = load_bundle(bundle)
    name, inp = b.name, b.manifest["input"].get("name", "image")
    k = min(TOP_K, len(b.manifest["class_names"]))
    pixels = Preprocessor.from_manifest(b.manifest["preprocessing"], max_pixels=10**9)(image)[None]  # (1, H, W, C)
    out = [{"name": "probabilities", "parameters": {"classification": k, "binary_data": True}}]
    path = f"/v2/models/{name}/infer"
    form, ctype = multipart({"top_k": str(k)}, [("image", (filename, image, "application/octet-stream"))])
    files = join_bytes([image])
    return {
        **_grpc_bodies(name, inp, k, pixels, files),
        "multipart": ("/classify", form, {"CONTENT_TYPE": ctype}),
        "oip-bytes": (path, *_oip({"inputs": [{"name": inp, "datatype": "BYTES", "shape": [1],
                                               "parameters": {"binary_data_size": len(files)}}], "outputs": out}, files)),
        "oip-uint8": (path, *_oip({"inputs": [{"name": inp, "datatype": "UINT8", "shape": list(pixels.shape),
                                               "parameters": {"binary_data_size": pixels.nbytes}}], "outputs": out},
                                  pixels.tobytes())),
        "oip-json": (path, *_oip({"inputs": [{"name": inp, "datatype": "BYTES", "shape": [1],
                                              "data": [base64.b64encode(image).decode()]}],
                                  "outputs": [{"name": "probabilities", "parameters": {"classification": k}}]},
                                 None)),
    }


def _grpc_bodies(name: str, inp: str, k: int, pixels: np.ndarray, files: bytes) -> dict[str, tuple[str, bytes, dict]]:
    """The gRPC kinds: (GRPC, serialized ModelInferRequest, {}), outputs as the REST kinds ask them."""
    from service.oip_grpc_gen import grpc_service_pb2 as pb

    def call(datatype: str, shape: list[int], raw: bytes) -> bytes:
        out = pb.ModelInferRequest.InferRequestedOutputTensor(
            name="probabilities", parameters={"classification": pb.InferParameter(int64_param=k)})
        return pb.ModelInferRequest(model_name=name, inputs=[pb.ModelInferRequest.InferInputTensor(
            name=inp, datatype=datatype, shape=shape)], raw_input_contents=[raw], outputs=[out]).SerializeToString()

    uint8 = call("UINT8", list(pixels.shape), pixels.tobytes())
    return {"grpc-uint8": (GRPC, uint8, {}), "grpc-bytes": (GRPC, call("BYTES", [1], files), {}),
            "grpc-stream": (GRPC_STREAM, uint8, {})}


def _grpc_top1(grpc_url: str, message: bytes, stream: bool = False) -> str:
    import grpc

    from service.oip_grpc_gen import grpc_service_pb2 as pb

    with grpc.insecure_channel(grpc_url) as ch:
        if stream:
            (answer,) = ch.stream_stream(grpc_load.STREAM_PATH)(iter([message]), timeout=60)
            reply = pb.ModelStreamInferResponse.FromString(answer)
            if reply.error_message:
                raise RuntimeError(f"grpc-stream: {reply.error_message}")
            response = reply.infer_response
        else:
            response = pb.ModelInferResponse.FromString(ch.unary_unary(grpc_load.PATH)(message, timeout=60))
    raw = response.raw_output_contents[0]
    return raw[4:4 + int.from_bytes(raw[:4], "little")].decode().split(":", 2)[2]


def _top1(kind: str, status: int, body: bytes, headers) -> str:
    """The top class label of one answer (multipart JSON, or OIP JSON/binary classification)."""
    if status != 200:
        raise RuntimeError(f"{kind}: HTTP {status}: {body[:300]!r}")
    if kind == "multipart":
        return json.loads(body)["predictions"][0]["label"]
    n = int(headers.get("Inference-Header-Content-Length", len(body)))
    out = json.loads(body[:n])["outputs"][0]
    if "data" in out:
        return out["data"][0].split(":", 2)[2]
    first = body[n + 4:n + 4 + int.from_bytes(body[n:n + 4], "little")]
    return first.decode().split(":", 2)[2]


def check(url: str, cases: dict[str, tuple[str, bytes, dict[str, str]]], grpc_url: str | None = None) -> None:
    """Every kind answers 200 (gRPC: OK) with the same top class as /classify."""
    labels = {}
    for kind, (path, body, env) in cases.items():
        if path in GRPC_PATHS:
            labels[kind] = _grpc_top1(grpc_url, body, stream=path == GRPC_STREAM)
            continue
        headers = {"Content-Type": env["CONTENT_TYPE"]}
        if "HEADER_LENGTH" in env:
            headers["Inference-Header-Content-Length"] = env["HEADER_LENGTH"]
        req = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                labels[kind] = _top1(kind, r.status, r.read(), r.headers)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{kind}: HTTP {e.code}: {e.read()[:300]!r}") from None
    if len(set(labels.values())) != 1:
        raise RuntimeError(f"the kinds disagree on the top class: {labels}")


def interleaved(url: str, cases: dict[str, tuple[str, bytes, dict[str, str]]], rounds: int) -> dict[str, dict]:
    """One request of each kind in turn, ``rounds`` times, one keep-alive connection per kind:
    sequential latency with the machine's load drift shared equally by every kind."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conns = {k: http.client.HTTPConnection(u.hostname, u.port, timeout=60) for k in cases}
    ms: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for kind, (path, body, env) in cases.items():
            headers = {"Content-Type": env["CONTENT_TYPE"]}
            if "HEADER_LENGTH" in env:
                headers["Inference-Header-Content-Length"] = env["HEADER_LENGTH"]
            t0 = time.perf_counter()
            conns[kind].request("POST", path, body, headers)
            r = conns[kind].getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"{kind}: HTTP {r.status}")
            ms[kind].append((time.perf_counter() - t0) * 1e3)
    for c in conns.values():
        c.close()
    return {k: {"p50_ms": round(statistics.median(v), 3), "mean_ms": round(statistics.mean(v), 3)} for k, v in ms.items()}


def run_case(bundle: Path, image_spec: str, kinds: list[str], concs: list[int], duration_s: int, out: Path,
             env: dict[str, str], rounds: int = 0, repeat: int = 1, stream_messages: int = STREAM_MESSAGES,
             max_in_flight: int = 0) -> list[dict]:
    image, filename = _image_bytes(image_spec, bundle)
    cases = {k: v for k, v in bodies(bundle, image, filename).items() if k in kinds}
    grpc_url = None
    if any(path in GRPC_PATHS for path, _, _ in cases.values()):
        port = launcher.free_port()
        env, grpc_url = {**env, "IMGSERVE_GRPC_PORT": str(port)}, f"127.0.0.1:{port}"
    server = launcher.service_server([str(bundle)], launcher.free_port(), out / f"serve-{bundle.name}.log", env)
    rows: list[dict] = []
    with server.start():
        server.wait_ready()
        check(server.url, cases, grpc_url)
        if rounds:
            http_cases = {k: v for k, v in cases.items() if v[0] not in GRPC_PATHS}
            for kind, v in interleaved(server.url, http_cases, rounds).items():
                log.info("interleaved %-10s p50 %7.2f ms  mean %7.2f ms", kind, v["p50_ms"], v["mean_ms"])
                rows.append({"bundle": bundle.name, "kind": kind, "interleaved_rounds": rounds, **v})
        files = {}
        for kind, (path, body, wrk_env) in cases.items():
            files[kind] = out / f"body-{bundle.name}-{kind}.bin"
            files[kind].write_bytes(body)
        # Kinds interleaved at each concurrency: a shared machine's load drifts, and the figures
        # compared with each other should be measured as close in time as possible.
        for c in [c for _ in range(repeat) for c in concs]:
            for kind, (path, body, wrk_env) in cases.items():
                in_flight = c * (stream_messages if path == GRPC_STREAM else 1)
                if max_in_flight and in_flight > max_in_flight:
                    continue
                if path in GRPC_PATHS:
                    (r,) = grpc_load.measure(server, grpc_url, body, [c], duration_s,
                                             stream_messages=stream_messages if path == GRPC_STREAM else 0)
                else:
                    (r,) = measure_server(server, path, {**wrk_env, "BODY_FILE": str(files[kind])}, [c], duration_s)
                rows.append({"bundle": bundle.name, "image": image_spec, "image_bytes": len(image), "kind": kind,
                             "body_bytes": len(body), "concurrency": r.concurrency, "in_flight": in_flight,
                             "ok_rps": round(r.ok_rps, 1),
                             "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors, "error_detail": r.error_detail,
                             "cpu_ms_per_req": round(r.cpu_ms_per_req or 0, 2)})
    return rows


def medians(rows: list[dict]) -> list[dict]:
    """One row per (bundle, kind, concurrency): the median of each figure over the repeats, errors summed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "concurrency" in r:
            groups.setdefault((r["bundle"], r["kind"], r["concurrency"]), []).append(r)
    out = []
    for g in groups.values():
        m = {**g[0], "repeats": len(g), "errors": sum(r["errors"] for r in g),
             "error_detail": "; ".join(str(r["error_detail"]) for r in g if r["error_detail"])}
        for key in ("ok_rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
            m[key] = statistics.median(r[key] or 0 for r in g)
        out.append(m)
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'bundle':<10} {'kind':<11} {'body B':>8} {'conc':>4} {'flight':>6} {'ok req/s':>9} {'p50 ms':>8} "
             f"{'p99 ms':>8} {'errors':>6} {'CPU ms/req':>10}  non-2xx"]
    rows = [r for r in rows if "concurrency" in r]
    lines += [f"{r['bundle']:<10} {r['kind']:<11} {r['body_bytes']:>8} {r['concurrency']:>4} {r['in_flight']:>6} "
              f"{r['ok_rps']:>9.1f} "
              f"{r['p50_ms'] or 0:>8.1f} {r['p99_ms'] or 0:>8.1f} {r['errors']:>6} {r['cpu_ms_per_req']:>10.2f}  {r['error_detail']}"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", required=True, metavar="BUNDLE:IMAGE",
                    help="a bundle directory and the image to send (fashion, digit, china, flower or a file)")
    ap.add_argument("--kinds", default="multipart,oip-bytes,oip-uint8,oip-json",
                    help="comma list of request kinds (also grpc-uint8, grpc-bytes, grpc-stream)")
    ap.add_argument("--stream-messages", type=int, default=STREAM_MESSAGES,
                    help="grpc-stream: messages per stream, all sent at once (in flight together)")
    ap.add_argument("--max-in-flight", type=int, default=0,
                    help="skip the points with more requests in flight (clients x messages per stream) than this")
    ap.add_argument("--concurrency", default="1,8,32", help="comma list of wrk connections")
    ap.add_argument("--duration", type=int, default=10, help="seconds per point")
    ap.add_argument("--rounds", type=int, default=0,
                    help="first, this many interleaved sequential rounds (one request of each kind in turn)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure every concurrency this many times (all kinds each time); the table shows medians")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the server")
    ap.add_argument("--out", type=Path, default=HERE / "results" / ("oip-bench-" + time.strftime("%Y%m%d-%H%M%S")))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(kv.split("=", 1) for kv in a.env)
    concs = [int(c) for c in a.concurrency.split(",") if c]
    rows = []
    for case in a.case:
        bundle, _, image = case.partition(":")
        rows += run_case(Path(bundle), image or "auto", a.kinds.split(","), concs, a.duration, a.out, env, a.rounds,
                         a.repeat, a.stream_messages, a.max_in_flight)
    (a.out / "oip_bench.json").write_text(json.dumps(rows, indent=2))
    print(table(medians(rows)) if a.repeat > 1 else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
