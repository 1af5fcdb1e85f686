"""The GPU flavour on a GPU host: built from the bento on its stock CUDA 12.8 + cuDNN 9 base (the one
documented command, `make image FLAVOUR=gpu`, is `python -m container build --flavour gpu`), run with
the GPUs (docker `--gpus all`; podman through CDI, `--device nvidia.com/gpu=all`), serving on the CUDA
execution provider with the answers of the CPU process. Skipped where no CUDA device is visible."""
from __future__ import annotations

import httpx
import pytest

from ctr_run import READ_ONLY, build_image_cli, classify, inputs, start_container
from service.backends import cuda_device_count

pytestmark = pytest.mark.gpu
GPU_RUN_ARGS = {"docker": ["--gpus", "all"], "podman": ["--device", "nvidia.com/gpu=all"]}


@pytest.fixture(scope="module")
def gpu_image(engine, default_bundle, tmp_path_factory):
    if cuda_device_count() == 0:
        pytest.skip("no CUDA device on this host (the GPU image is built and run on GPU hosts only)")
    built = build_image_cli(engine, "gpu", "stock", default_bundle, tmp_path_factory.mktemp("ctr-gpu-build"))
    yield built
    engine.run("rmi", built["image"], check=False)


def test_gpu_image_serves_on_cuda_with_the_cpu_answers(engine, gpu_image, process) -> None:
    box = start_container(engine, gpu_image["alias"], args=[*GPU_RUN_ARGS[engine.name], *READ_ONLY], timeout_s=600)
    try:
        model = httpx.get(box.url + "/models", timeout=10).json()["models"][0]
        assert model["device"] == "cuda" and "CUDAExecutionProvider" in model["providers"], model
        for name, upload in inputs().items():
            want, got = classify(process.url, upload).json(), classify(box.url, upload).json()
            # GPU kernels sum in another order than the CPU's: same ranking, scores within 1e-3.
            assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]], (name, got, want)
            assert all(abs(g["score"] - w["score"]) < 1e-3 for g, w in zip(got["predictions"], want["predictions"]))
        assert box.exec("id", "-u").stdout.strip() == "1034"
    finally:
        box.remove()
