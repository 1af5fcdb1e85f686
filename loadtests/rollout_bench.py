"""Rollout under load: canary weights stepped by rewriting the shared IMGSERVE_TRAFFIC file while 8+
closed-loop clients keep sending, in one process and with replicas behind HAProxy, checked per request.

    flock /tmp/imgserve-bench.lock .venv/bin/python -m loadtests.rollout_bench \\
        --targets process,replicas --image localhost/imgserve:cpu --requests 5000 --clients 8

Two versions of `digits` that disagree on some inputs (``--v1``/``--v2`` bundle directories; without
them two small digits CNNs are trained and exported here: 12 epochs and 1 epoch). Offline, both are
run in this process on a pool of digits (the service's own bundle reader, preprocessing and backend),
and the inputs sent are picked from it: some where the versions agree, some where they disagree,
none near a tie. Each target serves ``digits@v1=A,digits@v2=B`` with one policy file, shared by
every replica (a folder mounted read-only at the same path, as a ConfigMap). The weights go
100/0 -> 90/10 -> 50/50 -> 0/100 -> 100/0, with ``shadow: {version: v2, fraction: 1.0}`` and
``sticky: X-User-Id``; every change is an atomic rename of the file. A step counts the requests
started after every server reports the new policy (GET /models), until --requests of
them. Half the requests carry X-User-Id of one of 100 tracked users, one per sticky bucket (so their
share follows the weights exactly), the other half none (a random split).

Checked per step, per target: the observed split (X-Model-Version, equal to the JSON `version`)
within --tolerance-pp of the weights; no non-2xx, in the step or while switching; every answer's
top-1 label is the one the answering version gives offline (a request runs on one version); every
tracked user on the version of its bucket, the same throughout the step, and between steps moved
only if the weights moved its bucket; the shadow series (imgserve_shadow_* on each server's
/metrics) against the agreement computed offline on the inputs the live version answered. Shadow
runs are shed under load and which ones is not observable, so under load the whole run is checked
by count (compared + shed = v1 answers; agreed within [expected - shed, expected]) and by rate
(within 4 sigma of the offline rate for that many draws without replacement), each step by rate;
then --exact-requests from one client, where nothing may be shed: agreed = expected, exactly.
Prints a table, saves rollout.json in --out; exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtests.soak import fire, image_post, split_url
from service import launcher
from service.traffic import BUCKETS, Policy, bucket, parse_policies

log = logging.getLogger(__name__)
MODEL = "digits"
VERSIONS = ("v1", "v2")
STEPS = ((100, 0), (90, 10), (50, 50), (0, 100), (100, 0))
STICKY = "X-User-Id"
SHADOW = {"version": "v2", "fraction": 1.0}
MIN_MARGIN = 0.1  # top-1 minus top-2 probability, both versions: batch shapes never flip such an answer
POLICY_TIMEOUT_S = 10.0
SHADOW_SERIES = ("compared", "agreed", "shed")


# -- the versions and the inputs ------------------------------------------------------------------
def make_versions(out: Path, v1_checkpoint: Path | None = None) -> dict[str, Path]:
    """Two digits CNNs as bundles of `digits`: v1 well trained (or from ``v1_checkpoint``), v2 one epoch."""
    from export import export_bundle
    from training.train import TrainConfig, train

    flags = dict(model="simple_cnn", dataset="digits", batch_size=32, optimizer="adam", lr=3e-3, augment=False,
                 device="cpu", threads=1, progress=False)
    ckpt = {"v1": v1_checkpoint, "v2": None}
    for v, (epochs, seed) in {"v1": (12, 0), "v2": (1, 1)}.items():
        if ckpt[v] is None:
            ckpt[v] = train(TrainConfig(**flags, epochs=epochs, seed=seed, out=str(out / f"run-{v}"))) / "best.pt"
    return {v: export_bundle(ckpt[v], out / f"digits-{v}", name=MODEL, version=v, samples=32) for v in VERSIONS}


@dataclass(frozen=True)
class Input:
    png: bytes
    labels: dict[str, str]  # version -> its top-1 label, offline

    @property
    def agree(self) -> bool:
        return self.labels["v1"] == self.labels["v2"]


def _digit_pngs() -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_digits

    out = []
    for a in load_digits().images:
        buf = io.BytesIO()
        Image.fromarray((a * (255 / 16)).astype("uint8"), "L").resize((28, 28), Image.BILINEAR).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def offline_top1(bundle: Path, pngs: list[bytes]) -> tuple[list[str], np.ndarray]:
    """Top-1 labels and top-1 minus top-2 margins of a bundle, with the service's own reader,
    preprocessing and backend (FP32 ONNX, one thread)."""
    from imgformat.bundle import load_bundle
    from imgformat.preprocess import Preprocessor
    from service.backends import create_backend
    from service.models import softmax

    b = load_bundle(bundle)
    pre = Preprocessor.from_manifest(b.manifest["preprocessing"], max_pixels=10_000_000)
    backend = create_backend("onnx", b.model_file("onnx", "fp32"), threads=1, device="cpu")
    p = softmax(backend.run(np.stack([pre(x) for x in pngs])))
    top2 = np.sort(p, axis=1)[:, -2:]
    return [b.manifest["class_names"][i] for i in p.argmax(axis=1)], top2[:, 1] - top2[:, 0]


def pick_inputs(bundles: dict[str, Path], n: int = 32, disagree: int = 8) -> list[Input]:
    """``n`` digits, up to ``disagree`` of them answered differently by the two versions; none near a tie."""
    pngs = _digit_pngs()
    (l1, m1), (l2, m2) = (offline_top1(bundles[v], pngs) for v in VERSIONS)
    clear = [i for i in range(len(pngs)) if min(m1[i], m2[i]) >= MIN_MARGIN]
    differ = [i for i in clear if l1[i] != l2[i]][:disagree]
    if not differ:
        raise SystemExit("the two versions agree on every clear input: the shadow check would prove nothing; "
                         "give --v2 a less trained model")
    same = [i for i in clear if l1[i] == l2[i]][: n - len(differ)]
    chosen = sorted(differ + same)
    return [Input(pngs[i], {"v1": l1[i], "v2": l2[i]}) for i in chosen]


def tracked_users() -> list[str]:
    """One user id per sticky bucket (0..99), by the service's own hash, in a fixed shuffled order:
    their share of requests on each version is the weights, and every boundary move moves some of them."""
    users: dict[int, str] = {}
    k = 0
    while len(users) < BUCKETS:
        users.setdefault(bucket(f"user-{k}"), f"user-{k}")
        k += 1
    order = list(range(BUCKETS))
    random.Random(0).shuffle(order)  # sent in this order: a step that ends mid-round still sees every range of buckets
    return [users[b] for b in order]


# -- the policy -----------------------------------------------------------------------------------
def policy_doc(weights: tuple[int, int]) -> dict:
    return {MODEL: {"weights": dict(zip(VERSIONS, weights)), "shadow": SHADOW, "sticky": STICKY}}


def parsed(weights: tuple[int, int]) -> Policy:
    return parse_policies(policy_doc(weights), {MODEL: set(VERSIONS)})[MODEL]


def write_policy(path: Path, weights: tuple[int, int]) -> None:
    """Replace the file in one rename (a reader sees the old or the new file, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(policy_doc(weights)))
    os.replace(tmp, path)


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def policy_in_force(server: str) -> dict | None:
    try:
        return get_json(server + "/models")["traffic"][MODEL]["weights"]
    except (OSError, KeyError, ValueError):
        return None


async def wait_policy(servers: list[str], weights: tuple[int, int]) -> float:
    """Seconds until every server reports these weights (GET /models, the name's `traffic`)."""
    want, t0 = dict(zip(VERSIONS, weights)), time.perf_counter()
    pending = list(servers)
    while pending:
        if time.perf_counter() - t0 > POLICY_TIMEOUT_S:
            raise RuntimeError(f"{pending} still not on {want} after {POLICY_TIMEOUT_S:.0f} s")
        got = await asyncio.gather(*(asyncio.to_thread(policy_in_force, s) for s in pending))
        pending = [s for s, w in zip(pending, got) if w != want]
        if pending:
            await asyncio.sleep(0.05)
    return time.perf_counter() - t0


def shadow_counts(servers: list[str]) -> dict[str, float]:
    """imgserve_shadow_{compared,agreed,shed}_total for (digits, v1, v2), summed over the servers."""
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(SHADOW_SERIES, 0.0)
    for s in servers:
        try:
            with urllib.request.urlopen(s + "/metrics", timeout=30) as r:
                text = r.read().decode()
        except OSError as e:
            raise RuntimeError(f"{s}/metrics did not answer: {e}") from e
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                kind = sample.name.removeprefix("imgserve_shadow_").removesuffix("_total")
                if (sample.name.startswith("imgserve_shadow_") and sample.name.endswith("_total") and kind in out
                        and sample.labels == {"model": MODEL, "live": "v1", "shadow": "v2"}):
                    out[kind] += sample.value
    return out


# -- the load -------------------------------------------------------------------------------------
@dataclass
class Sent:
    i: int
    input: int
    user: str | None
    started: float
    status: int | None
    version: str | None  # X-Model-Version
    body_version: str | None
    label: str | None
    error: str | None = None


class Load:
    """``clients`` closed-loop clients until ``stop``; request i sends input i % n, and every other
    request carries a tracked user's X-User-Id."""

    def __init__(self, url: str, inputs: list[Input], users: list[str], clients: int) -> None:
        self.host, self.port = split_url(url)
        self.inputs, self.users, self.clients = inputs, users, clients
        self.sent: list[Sent] = []
        self.stop = False
        self._next = 0

    def request(self, i: int) -> tuple[bytes, int, str | None]:
        k, user = i % len(self.inputs), self.users[(i // 2) % len(self.users)] if i % 2 == 0 else None
        return image_post(self.inputs[k].png, form={"top_k": "1"}, headers={STICKY: user} if user else None), k, user

    async def _client(self) -> None:
        while not self.stop:
            i, self._next = self._next, self._next + 1
            req, k, user = self.request(i)
            r = await fire(self.host, self.port, req, timeout=60.0)
            body = {}
            if r.status == 200:
                try:
                    body = r.json()
                except ValueError:
                    pass
            preds = body.get("predictions") or [{}]
            self.sent.append(Sent(i, k, user, r.started, r.status, r.headers.get("x-model-version"),
                                  body.get("version"), preds[0].get("label"), r.error))
            if r.status is None:
                await asyncio.sleep(0.01)

    async def run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    def started_since(self, t: float, scan: list[int]) -> int:
        """Requests started at or after t; ``scan`` = [answers already looked at, count so far]."""
        for s in self.sent[scan[0]:]:
            scan[1] += s.started >= t
        scan[0] = len(self.sent)
        return scan[1]


@dataclass
class Window:
    weights: tuple[int, int]
    switch_started: float  # file renamed
    on: float  # every server reports the new policy
    end: float = 0.0
    took_s: float = 0.0
    shadow_before: dict = field(default_factory=dict)
    shadow_after: dict = field(default_factory=dict)
    reads: list[tuple[float, float]] = field(default_factory=list)  # when the two shadow snapshots were read

    async def read_shadow(self, servers: list[str]) -> dict:
        t0 = time.perf_counter()
        counts = await asyncio.to_thread(shadow_counts, servers)
        self.reads.append((t0, time.perf_counter()))
        return counts


async def drive(load: Load, servers: list[str], policy: Path, per_step: int) -> tuple[list[Window], dict, dict]:
    """Run the load and the steps; returns the windows and the shadow counts before and after."""
    base = await asyncio.to_thread(shadow_counts, servers)
    task = asyncio.create_task(load.run())
    windows = []
    try:
        for weights in STEPS:
            t_switch = time.perf_counter()
            write_policy(policy, weights)
            took = await wait_policy(servers, weights)
            w = Window(weights, t_switch, time.perf_counter(), took_s=took)
            w.shadow_before = await w.read_shadow(servers)
            scan = [0, 0]
            while load.started_since(w.on, scan) < per_step:
                if task.done():
                    task.result()
                    raise RuntimeError("the load stopped")
                await asyncio.sleep(0.1)
            w.end = time.perf_counter()
            w.shadow_after = await w.read_shadow(servers)
            log.info("step %s: %d requests, policy on every server after %.2f s", weights, per_step, took)
            windows.append(w)
    finally:
        load.stop = True
        await task
    return windows, base, await settled_shadow(servers, load, base)


async def settled_shadow(servers: list[str], load: Load, base: dict, timeout_s: float = 20.0) -> dict:
    """The shadow counts once every v1 answer's shadow run is compared or shed (they finish after
    the answer), or after ``timeout_s`` (then the count check below fails)."""
    v1 = sum(s.status == 200 and s.version == "v1" for s in load.sent)
    t0 = time.perf_counter()
    while True:
        now = await asyncio.to_thread(shadow_counts, servers)
        done = now["compared"] + now["shed"] - base["compared"] - base["shed"]
        if done >= v1 or time.perf_counter() - t0 > timeout_s:
            return now
        await asyncio.sleep(0.25)


async def one_client(url: str, servers: list[str], inputs: list[Input], users: list[str], n: int) -> dict:
    """``n`` requests from one client: nothing waits for the inference thread, so no shadow run may be
    shed and the service's agreement must equal the offline one exactly."""
    before = await asyncio.to_thread(shadow_counts, servers)
    load = Load(url, inputs, users, 1)
    task = asyncio.create_task(load.run())
    while len(load.sent) < n and not task.done():
        await asyncio.sleep(0.05)
    load.stop = True
    await task
    return shadow_check(load.sent, inputs, delta(await settled_shadow(servers, load, before), before))


# -- the checks -----------------------------------------------------------------------------------
def delta(after: dict, before: dict) -> dict[str, int]:
    return {k: int(round(after[k] - before[k])) for k in SHADOW_SERIES}


def shadow_check(sent: list[Sent], inputs: list[Input], counts: dict[str, int], slack: int = 0) -> dict:
    """The service's shadow counts against the offline agreement on the inputs v1 answered.

    Exact when nothing was shed; otherwise the agreed count is bounded by what was shed and its
    rate is a draw without replacement from the v1 answers. ``slack``: answers at the window's edges
    whose shadow may be counted in the window before or after (per-step figures under running load)."""
    v1 = [s for s in sent if s.status == 200 and s.version == "v1"]
    n, expect = len(v1), sum(inputs[s.input].agree for s in v1)
    c, a, shed = counts["compared"], counts["agreed"], counts["shed"]
    p = expect / n if n else float("nan")
    sigma = math.sqrt(p * (1 - p) / c * max(n - c, 0) / max(n - 1, 1)) if c and n else 0.0
    rate = a / c if c else float("nan")
    ok = (abs(c + shed - n) <= slack and expect - shed - slack <= a <= expect + slack
          and (not c or abs(rate - p) <= 4 * sigma + (slack + 1) / c))
    return {"v1_answers": n, "expected_agreed": expect, "offline_agreement": p, "compared": c, "agreed": a,
            "shed": shed, "service_agreement": rate, "exact": shed == 0 and c == n and a == expect, "ok": bool(ok)}


def sticky_versions(sent: list[Sent]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for s in sent:
        if s.user and s.status == 200:
            out[s.user].add(s.version)
    return out


def edge_requests(w: Window, sent: list[Sent], lag_s: float = 1.0) -> int:
    """Requests whose shadow run may fall on either side of a snapshot of the step: started while it
    was read, or up to ``lag_s`` before (the answer and the shadow run come after the start)."""
    return sum(any(t0 - lag_s <= s.started <= t1 for t0, t1 in w.reads) for s in sent)


def step_report(w: Window, sent: list[Sent], switching: list[Sent], inputs: list[Input], slack: int,
                before: dict[str, str] | None, before_policy: Policy | None) -> dict:
    n = len(sent)
    pol = parsed(w.weights)
    split = Counter(s.version for s in sent if s.status == 200)
    share = {v: 100.0 * split[v] / n if n else 0.0 for v in VERSIONS}
    off = max(abs(share[v] - wt) for v, wt in zip(VERSIONS, w.weights))
    users = sticky_versions(sent)
    now = {u: next(iter(vs)) for u, vs in users.items() if len(vs) == 1}
    wrong_bucket = sorted(u for u, v in now.items() if v != pol.version_for_bucket(bucket(u)))
    moved = sorted(u for u in now if before and u in before and before[u] != now[u])
    allowed = {u for u in now if before_policy and before_policy.version_for_bucket(bucket(u))
               != pol.version_for_bucket(bucket(u))}
    switch_bad = [s.user for s in switching if s.user and s.status == 200 and s.version not in
                  {pol.version_for_bucket(bucket(s.user)),
                   (before_policy or pol).version_for_bucket(bucket(s.user))}]
    return {
        "weights": list(w.weights), "requests": n, "share_pct": share, "max_off_pp": off,
        "non2xx": sum(s.status != 200 for s in sent), "non2xx_switching": sum(s.status != 200 for s in switching),
        "switching_requests": len(switching), "policy_took_s": w.took_s,
        "header_body_mismatch": sum(s.status == 200 and s.version != s.body_version for s in sent + switching),
        "wrong_label": sum(s.status == 200 and s.label != inputs[s.input].labels.get(s.version or "")
                           for s in sent + switching),
        "users": len(users), "users_split_in_step": sum(len(vs) > 1 for vs in users.values()),
        "users_off_bucket": len(wrong_bucket), "users_moved": len(moved), "users_allowed_to_move": len(allowed),
        "users_moved_unexpectedly": len(set(moved) - allowed), "users_off_while_switching": len(switch_bad),
        "shadow": shadow_check(sent, inputs, delta(w.shadow_after, w.shadow_before), slack=slack),
        "_now": now,
    }


ZERO = ("non2xx", "non2xx_switching", "header_body_mismatch", "wrong_label", "users_split_in_step",
        "users_off_bucket", "users_moved_unexpectedly", "users_off_while_switching")


def failed_checks(r: dict, tolerance_pp: float) -> list[str]:
    """The names of the step's checks that failed (empty: the step passed)."""
    failed = [k for k in ZERO if r[k]]
    if r["max_off_pp"] > tolerance_pp:
        failed.append("split")
    if not r["shadow"]["ok"]:
        failed.append("shadow")
    return failed


def analyse(load: Load, windows: list[Window], base: dict, final: dict, tolerance_pp: float) -> dict:
    steps, before, before_policy = [], None, None
    for w in windows:
        in_step = [s for s in load.sent if w.on <= s.started < w.end]
        switching = [s for s in load.sent if w.switch_started <= s.started < w.on]
        r = step_report(w, in_step, switching, load.inputs, edge_requests(w, load.sent), before, before_policy)
        before, before_policy = r.pop("_now"), parsed(w.weights)
        r["failed"] = failed_checks(r, tolerance_pp)
        r["ok"] = not r["failed"]
        steps.append(r)
    whole = shadow_check(load.sent, load.inputs, delta(final, base))
    non2xx = Counter(str(s.status or s.error) for s in load.sent if s.status != 200)
    return {"steps": steps, "shadow_whole_run": whole, "requests": len(load.sent), "non2xx": dict(non2xx),
            "ok": all(r["ok"] for r in steps) and whole["ok"] and not non2xx}


# -- the targets ----------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    url: str  # where the clients send
    servers: list[str]  # each server, for its policy and its /metrics


def env_for(bundles: dict[str, Path], policy: Path) -> dict[str, str]:
    return {"IMGSERVE_MODELS": ",".join(f"{MODEL}@{v}={bundles[v].resolve()}" for v in VERSIONS),
            "IMGSERVE_TRAFFIC": str(policy.resolve())}


def start_process(bundles: dict[str, Path], policy: Path, out: Path, stack: ExitStack) -> Target:
    srv = launcher.bentoml_serve(launcher.SERVICE, launcher.free_port(), out / "process.log",
                                 {**env_for(bundles, policy), "BENTOML_HOME": str(out / "bentoml-home")})
    stack.enter_context(srv)
    srv.start()
    srv.wait_ready()
    return Target("1 process", srv.url, [srv.url])


def start_replicas(n: int, runner: str, image: str, bundles: dict[str, Path], policy: Path, out: Path,
                   stack: ExitStack) -> Target:
    from deploy.replicas.cluster import Cluster

    shared = sorted({str(bundles[v].resolve()) for v in VERSIONS} | {str(policy.resolve().parent)})
    c = Cluster(out / f"replicas-{runner}", runner=runner, image=image, shared=shared)
    stack.callback(c.down)
    c.up(n, {**env_for(bundles, policy), "IMGSERVE_THREADS": str(max(1, (os.cpu_count() or 1) // n))}, None, port=0)
    return Target(f"{n} replicas ({runner}) + HAProxy", c.url, [r.url for r in c.replicas().values()])


def measure(target: Target, inputs: list[Input], users: list[str], policy: Path, args) -> dict:
    write_policy(policy, STEPS[0])
    load = Load(target.url, inputs, users, args.clients)
    t0 = time.perf_counter()
    windows, base, final = asyncio.run(drive(load, target.servers, policy, args.requests))
    res = analyse(load, windows, base, final, args.tolerance_pp)
    # The policy is 100/0 again: v1 answers everything, v2 shadows everything it can.
    res["shadow_one_client"] = exact = asyncio.run(one_client(target.url, target.servers, inputs, users,
                                                              args.exact_requests))
    res["ok"] = res["ok"] and exact["exact"]
    res.update(target=target.name, seconds=time.perf_counter() - t0, clients=args.clients)
    return res


# -- output ---------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    head = ("| target | weights v1/v2 | requests | v1 % | v2 % | max off pp | non-2xx (step / switching) | "
            "policy on all servers s | users moved (bucket moved) | users off | shadow compared / shed | "
            "agreement service / offline | ok |\n|---|---|---:|---:|---:|---:|---|---:|---|---:|---|---|---|")
    rows = []
    for res in results:
        for r in res["steps"]:
            sh = r["shadow"]
            agree = (f"{sh['service_agreement']:.4f} / {sh['offline_agreement']:.4f}" if sh["compared"]
                     else f"- / {sh['offline_agreement']:.4f}" if sh["v1_answers"] else "- (v1 answers none)")
            off_users = r["users_off_bucket"] + r["users_split_in_step"] + r["users_moved_unexpectedly"] + \
                r["users_off_while_switching"]
            rows.append(f"| {res['target']} | {r['weights'][0]}/{r['weights'][1]} | {r['requests']} | "
                        f"{r['share_pct']['v1']:.2f} | {r['share_pct']['v2']:.2f} | {r['max_off_pp']:.2f} | "
                        f"{r['non2xx']} / {r['non2xx_switching']} | {r['policy_took_s']:.2f} | "
                        f"{r['users_moved']} ({r['users_allowed_to_move']}) | {off_users} | "
                        f"{sh['compared']} / {sh['shed']} | {agree} | {'yes' if r['ok'] else 'NO: ' + ', '.join(r['failed'])} |")
    lines = [head, *rows, ""]
    for res in results:
        w = res["shadow_whole_run"]
        lines.append(f"{res['target']}: {res['requests']} requests in {res['seconds']:.0f} s, non-2xx {res['non2xx'] or 0}; "
                     f"shadow over the run: {w['compared']} compared + {w['shed']} shed of {w['v1_answers']} v1 answers, "
                     f"agreed {w['agreed']} (offline {w['expected_agreed']}), agreement {w['service_agreement']:.4f} "
                     f"vs {w['offline_agreement']:.4f} offline{' (exact)' if w['exact'] else ''}: "
                     f"{'ok' if w['ok'] else 'FAILED'}")
        e = res["shadow_one_client"]
        lines.append(f"{res['target']}, then one client: {e['v1_answers']} v1 answers, {e['compared']} compared, "
                     f"{e['shed']} shed, agreed {e['agreed']} (offline {e['expected_agreed']}): "
                     f"{'exact' if e['exact'] else 'NOT EXACT'}")
    return "\n".join(lines)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--v1", type=Path, help="bundle of version v1 (default: trained and exported here)")
    p.add_argument("--v2", type=Path, help="bundle of version v2, disagreeing with v1 on some inputs")
    p.add_argument("--targets", default="process,replicas", help="comma list of: process, replicas")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--runner", default="podman", help="replicas as podman containers (default) or processes")
    p.add_argument("--image", default=os.environ.get("IMGSERVE_IMAGE", "localhost/imgserve:cpu"),
                   help="the image the podman replicas run (built from this checkout: python -m container build)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients (default 8)")
    p.add_argument("--requests", type=int, default=5000, help="requests counted per step (default 5000)")
    p.add_argument("--exact-requests", type=int, default=500,
                   help="then requests from one client, where the shadow agreement must be exact (default 500)")
    p.add_argument("--tolerance-pp", type=float, default=2.0, help="allowed |observed - weight| (default 2 pp)")
    p.add_argument("--out", type=Path, default=Path("loadtests/results") / time.strftime("rollout-%Y%m%d-%H%M%S"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.clients < 8:
        raise SystemExit("--clients: at least 8 (issue 22: 8 or more closed-loop clients)")
    a.out.mkdir(parents=True, exist_ok=True)
    bundles = {"v1": a.v1, "v2": a.v2} if a.v1 and a.v2 else make_versions(a.out / "versions")
    results = run(bundles, [t.strip() for t in a.targets.split(",") if t.strip()], a)
    print(table(results))
    return 0 if all(r["ok"] for r in results) else 1


def run(bundles: dict[str, Path], targets: list[str], a) -> list[dict]:
    """Measure each target in turn (one at a time: they share the machine); saves rollout.json."""
    inputs, users = pick_inputs(bundles), tracked_users()
    log.info("%d inputs, %d where v1 and v2 disagree; %d tracked users", len(inputs),
             sum(not x.agree for x in inputs), len(users))
    policy_dir = a.out / "policy"
    policy_dir.mkdir(parents=True, exist_ok=True)
    policy_dir.chmod(0o755)
    policy = policy_dir / "traffic.json"
    start = {"process": lambda s: start_process(bundles, policy, a.out, s),
             "replicas": lambda s: start_replicas(a.replicas, a.runner, a.image, bundles, policy, a.out, s)}
    results = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for name in targets:
        write_policy(policy, STEPS[0])
        with ExitStack() as stack:
            target = start[name](stack)
            load_before = loadavg()
            res = measure(target, inputs, users, policy, a)
            res.update(loadavg_before=load_before, loadavg_after=loadavg())
        results.append(res)
        (a.out / "rollout.json").write_text(json.dumps(  # after each target: a later failure keeps it
            {"results": results, "bundles": {v: str(b) for v, b in bundles.items()}, "commit": commit,
             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": {k: str(v) for k, v in vars(a).items()},
             "inputs": {"n": len(inputs), "disagree": sum(not x.agree for x in inputs)}}, indent=1, default=str))
        log.info("saved %s", a.out / "rollout.json")
    return results


if __name__ == "__main__":
    sys.exit(main())
