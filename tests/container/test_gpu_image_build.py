"""The GPU flavour built here, without a GPU and without a registry (`make image FLAVOUR=gpu`:
python -m container build --flavour gpu): onnxruntime-gpu with the CUDA 12 and cuDNN 9 runtime
wheels on the CPU image's base. Checked: every shared library of onnxruntime's CUDA provider resolves
inside the image (ldd; the TensorRT provider's libnvinfer is not shipped), onnxruntime lists the CUDA provider, and with no GPU the service starts,
serves on the CPU with the CPU process's answers and says so in /models. Prints the image's size
and what takes it. test_gpu_image.py runs the image with a GPU where one is present."""
from __future__ import annotations

import json

import httpx
import pytest

from ctr_run import READ_ONLY, build_image_cli, classify, inputs, start_container

pytestmark = [pytest.mark.slow, pytest.mark.gpu_image]  # CI skips it: -m gpu_image runs it
PY = "/app/.venv/bin/python"

# In the image: the CUDA provider's libraries and each one's unresolved dependencies (ldd "not found"),
# onnxruntime's providers, and the largest installed distributions with their size.
PROBE = r"""
import glob, importlib.metadata as md, json, os, subprocess, onnxruntime as ort
capi = os.path.dirname(ort.__file__) + "/capi"
libs = sorted(glob.glob(capi + "/libonnxruntime_providers_*.so"))
missing = {os.path.basename(l): [ln.strip() for ln in subprocess.run(["ldd", l], capture_output=True, text=True).stdout.splitlines() if "not found" in ln] for l in libs}
sizes = {}
for d in md.distributions():
    n = 0
    for f in d.files or []:
        p = d.locate_file(f)
        try:
            n += os.path.getsize(p)
        except OSError:
            pass
    sizes[d.metadata["Name"]] = n
print(json.dumps({"libs": [os.path.basename(l) for l in libs], "missing": missing,
                  "providers": ort.get_available_providers(), "sizes": sizes}))
"""


@pytest.fixture(scope="module")
def gpu_image(engine, default_bundle, tmp_path_factory):
    built = build_image_cli(engine, "gpu", "auto", default_bundle, tmp_path_factory.mktemp("ctr-gpu-build"))
    yield built
    engine.run("rmi", built["image"], check=False)  # the `gpu` alias keeps the layers for the next build


def test_cuda_provider_resolves_and_the_size_is_known(engine, gpu_image) -> None:
    out = engine.run("run", "--rm", "--network=none", "--entrypoint", PY, gpu_image["alias"], "-c", PROBE, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "libonnxruntime_providers_cuda.so" in got["libs"], got["libs"]
    cuda = {lib: got["missing"][lib] for lib in ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_shared.so")}
    assert not any(cuda.values()), f"unresolved libraries: {cuda}"
    assert "CUDAExecutionProvider" in got["providers"], got["providers"]
    top = sorted(got["sizes"].items(), key=lambda kv: -kv[1])[:10]
    venv = sum(got["sizes"].values())
    print(f"\nGPU image {gpu_image['alias']}: {gpu_image['size_bytes'] / 1e6:.0f} MB, Python packages {venv / 1e6:.0f} MB; "
          f"largest: " + ", ".join(f"{n} {s / 1e6:.0f} MB" for n, s in top))
    print(f"ldd: {', '.join(cuda)}: nothing missing; providers {got['providers']}; not shipped (TensorRT EP, "
          f"service/backends.py uses it only when libnvinfer loads): {got['missing'].get('libonnxruntime_providers_tensorrt.so')}")


def test_without_a_gpu_it_serves_on_the_cpu_and_says_so(engine, gpu_image, process) -> None:
    box = start_container(engine, gpu_image["alias"], args=READ_ONLY, timeout_s=300)
    try:
        (model,) = httpx.get(box.url + "/models", timeout=10).json()["models"]
        assert model["device"] == "cpu" and model["providers"] == ["CPUExecutionProvider"], model
        for name, upload in inputs().items():
            want, got = classify(process.url, upload), classify(box.url, upload)
            assert got.status_code == want.status_code == 200, (name, got.text, want.text)
            assert got.json() == want.json(), f"{name}: GPU image on CPU {got.json()} != process {want.json()}"
        assert box.exec("id", "-u").stdout.strip() == "1034"
    finally:
        box.remove()
