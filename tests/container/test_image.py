"""The CPU serving image, built from the bento and run by a real engine (podman here, docker where
that is the engine): what is in it, that it answers exactly as the same bundle served as a process,
read-only and unprivileged, with a mounted bundle and a mounted API-key file, bad inputs, SIGTERM."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from ctr_run import LIMITS, READ_ONLY, Container, classify, healthcheck, inputs, start_container
from loadtests.payloads import bad_cases, photo_jpegs

MAX_IMAGE_BYTES = 700e6  # the bound for the CPU image


@pytest.fixture(scope="module")
def baked(engine, cpu_image):
    """The image as built: its baked-in model, read-only root filesystem, limits from the environment."""
    box = start_container(engine, cpu_image["alias"], env=LIMITS, args=READ_ONLY)
    yield box
    box.remove()


def test_image_is_lean_and_keeps_no_secrets(engine, cpu_image) -> None:
    image = cpu_image["alias"]
    assert cpu_image["size_bytes"] <= MAX_IMAGE_BYTES, f"{image} is {cpu_image['size_bytes'] / 1e6:.0f} MB"
    cfg = json.loads(engine.run("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert cfg["User"] == "bentoml", cfg["User"]
    assert "/readyz" in " ".join(healthcheck(engine, image)), healthcheck(engine, image)
    names = {e.split("=", 1)[0].upper() for e in cfg["Env"]}
    leaked = {n for n in names if "PROXY" in n or n.startswith(("PIP_", "UV_", "SSL_CERT", "REQUESTS_CA"))
              or n in ("IMGSERVE_API_KEY", "IMGSERVE_API_KEY_FILE")}
    assert not leaked, f"build-time or secret settings in the image's environment: {leaked}"
    probe = ("import glob, importlib.metadata as md, importlib.util as u, json, shutil, onnxruntime as ort\n"
             "print(json.dumps({'tools': [t for t in ('gcc', 'cc', 'g++', 'c++', 'clang', 'make', 'git', 'uv')"
             " if shutil.which(t)], 'torch': u.find_spec('torch') is not None,"
             " 'ort': [d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].startswith('onnxruntime')],"
             " 'gpu_providers': [p for p in ort.get_available_providers() if 'CUDA' in p or 'Tensorrt' in p],"
             " 'cuda_libs': [f for lib in ('libcudart', 'libcublas', 'libcudnn', 'libnvinfer')"
             "               for f in glob.glob(f'/app/**/{lib}*', recursive=True)]}))")
    out = engine.run("run", "--rm", "--network=none", "--entrypoint", "/app/.venv/bin/python", image, "-c", probe)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"tools": [], "torch": False, "ort": ["onnxruntime"], "gpu_providers": [], "cuda_libs": []}, got


def test_answers_match_the_process_read_only_and_unprivileged(baked: Container, process) -> None:
    for name, upload in inputs().items():
        want, got = classify(process.url, upload), classify(baked.url, upload)
        assert want.status_code == got.status_code == 200, (name, want.text, got.text)
        assert got.json() == want.json(), f"{name}: container {got.json()} != process {want.json()}"
    assert baked.exec("id", "-u").stdout.strip() == "1034"
    uid = [ln for ln in baked.exec("cat", "/proc/1/status").stdout.splitlines() if ln.startswith("Uid:")]
    assert uid and uid[0].split()[1:] == ["1034"] * 4, uid  # PID 1 (bentoml serve): real/effective/saved/fs
    for path in ("/home/bentoml/bento/x", "/app/x", "/x"):
        assert baked.exec("touch", path).returncode != 0, f"{path} is writable"


def test_healthcheck_and_settings_from_the_environment(engine, cpu_image, baked: Container) -> None:
    test = healthcheck(engine, cpu_image["alias"])
    assert test[0] in ("CMD", "CMD-SHELL"), test
    hc = baked.exec(*test[1:]) if test[0] == "CMD" else baked.exec("/bin/sh", "-c", test[1])
    assert hc.returncode == 0, hc.stderr[-1000:]
    five = [("images", (f"{i}.jpg", inputs()["photo"][1], "image/jpeg")) for i in range(5)]
    r = httpx.post(baked.url + "/classify_batch", files=five, timeout=30)
    assert r.status_code == 413 and " 4 files" in r.text, r.text  # IMGSERVE_MAX_IMAGES=4 reached the service


def test_bad_inputs_get_their_4xx(baked: Container) -> None:
    good = photo_jpegs((640,))[0]
    statuses = {}
    for case in bad_cases(good):
        r = httpx.post(baked.url + "/classify", files=list(case.files), data=case.form, timeout=30)
        statuses[case.name] = r.status_code
        assert r.status_code in case.expected, f"{case.name}: {r.status_code} {r.text[:300]}"
    big = httpx.post(baked.url + "/classify", files={"image": ("big.jpg", b"\xff" * 3_500_000, "image/jpeg")},
                     timeout=30)
    assert big.status_code == 413, big.text[:300]
    assert classify(baked.url, inputs()["fashion"]).status_code == 200, "a good request after the bad ones"
    print(f"\nbad inputs -> {statuses}")


def test_mounted_bundle_and_api_key_file(engine, cpu_image, digits_bundle, process, tmp_path) -> None:
    key = tmp_path / "api-key"
    key.write_text("k3y-from-a-mounted-file\n")
    key.chmod(0o644)
    box = start_container(engine, cpu_image["alias"],
                          env={"IMGSERVE_MODELS": "/models/digits", "IMGSERVE_API_KEY_FILE": "/run/secrets/api-key"},
                          args=[*READ_ONLY, "-v", f"{digits_bundle}:/models/digits:ro",
                                "-v", f"{key}:/run/secrets/api-key:ro"])
    try:
        assert httpx.get(box.url + "/models", timeout=10).json()["default"] == "digits"
        upload = inputs()["fashion"]
        assert classify(box.url, upload).status_code == 401
        got = classify(box.url, upload, headers={"Authorization": "Bearer k3y-from-a-mounted-file"})
        want = classify(process.url, upload, model="digits")
        assert got.status_code == want.status_code == 200, (got.text, want.text)
        assert got.json() == want.json()
        assert "k3y-from-a-mounted-file" not in box.logs()
    finally:
        box.remove()


def test_sigterm_drains_in_flight_requests_and_exits(engine, cpu_image) -> None:
    box = start_container(engine, cpu_image["alias"], env={"IMGSERVE_TIMEOUT_S": "20"}, args=READ_ONLY)
    upload = ("big.jpg", photo_jpegs((2000,))[0].data, "image/jpeg")  # tens of ms each: requests overlap the signal
    results: list[tuple[float, float, object]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status: object = client.post(box.url + "/classify", files={"image": upload}).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                results.append((t0, time.monotonic(), status))

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        t_term = time.monotonic()
        engine.run("kill", "--signal", "TERM", box.cid)
        exited = None
        while time.monotonic() - t_term < 30:
            state = box.state()
            if not state.get("Running"):
                exited = time.monotonic() - t_term
                break
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(60)
        code = box.state().get("ExitCode")
    finally:
        stop.set()
        box.remove()
    before = [s for t0, t1, s in results if t1 < t_term]
    across = [s for t0, t1, s in results if t0 < t_term <= t1]
    print(f"\nSIGTERM: exited after {exited} s with code {code}; in flight at the signal: {across}; "
          f"{len(before)} answered before")
    assert exited is not None and exited < 20, f"still running {exited} s after SIGTERM (IMGSERVE_TIMEOUT_S=20)"
    assert code == 0, f"exit code {code}: not a clean stop"
    assert before and all(s == 200 for s in before), before
    assert across and all(s in (200, 503) or isinstance(s, str) for s in across), across
    assert any(s == 200 for s in across), f"no request in flight at the signal was completed: {across}"
