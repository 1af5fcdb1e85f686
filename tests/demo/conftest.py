"""Fixtures for the demo-page tests: a small Fashion-MNIST model next to the shared digits bundle,
`bentoml serve` with both (and one with an API key), and headless Chromium driven by Selenium."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service.launcher import start_service

ROOT = Path(__file__).resolve().parents[2]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Screenshots land here (CI keeps them as artifacts); IMGSERVE_TEST_ARTIFACTS moves them.
ARTIFACTS = Path(os.environ.get("IMGSERVE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "demo"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")
API_KEY = "demo-test-key"


def missing(what: str) -> None:
    """Skip on a developer's machine; fail in CI (CI=true), where scripts/setup.sh installs it."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} (CI must run the browser tests)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def fashion_bundle(tmp_path_factory) -> Path:
    """gap_cnn (make serve's default: it explains) trained for real on 3000 Fashion-MNIST images (one
    epoch: enough to name a shoe), exported with the parity and CAM gates."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        missing("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (scripts/setup.sh does)")
    from export import export_bundle
    from training.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("fashion")
    run = train(TrainConfig(model="gap_cnn", dataset="fashion-mnist", limit=3000, epochs=1, batch_size=64,
                            optimizer="adam", lr=3e-3, augment=False, seed=0, device="cpu", threads=1, progress=False,
                            out=str(tmp / "run")))
    return export_bundle(run / "best.pt", tmp / "fashion", name="fashion", version="1", samples=16)


@pytest.fixture(scope="session")
def demo_server(fashion_bundle, digits_bundle, tmp_path_factory):
    """Fashion-MNIST (the default model) and the digits model, no API key."""
    tmp = tmp_path_factory.mktemp("demo-server")
    srv = start_service({"IMGSERVE_MODELS": f"{fashion_bundle},{digits_bundle}"}, tmp / "serve.log", tmp / "home")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def keyed_server(digits_bundle, tmp_path_factory):
    """The digits model behind an API key."""
    tmp = tmp_path_factory.mktemp("keyed-server")
    srv = start_service({"IMGSERVE_MODELS": str(digits_bundle), "IMGSERVE_API_KEY": API_KEY}, tmp / "serve.log",
                        tmp / "home")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def canary_server(digits_bundle, tmp_path_factory):
    """Two versions of digits (the same bundle twice, labelled v1 and v2) and a traffic policy file
    that sends everything to v2."""
    tmp = tmp_path_factory.mktemp("canary-server")
    (tmp / "traffic.yaml").write_text("digits: {weights: {v1: 0, v2: 100}}\n")
    srv = start_service({"IMGSERVE_MODELS": f"digits@v1={digits_bundle},digits@v2={digits_bundle}",
                         "IMGSERVE_TRAFFIC": str(tmp / "traffic.yaml")}, tmp / "serve.log", tmp / "home")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Chromium (Debian's chromium + chromium-driver) with a fresh profile."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        missing("chromium or chromedriver missing: apt-get install chromium chromium-driver (scripts/setup.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.add_argument("--window-size=1100,900")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="session")
def api_key() -> str:
    """The key ``keyed_server`` wants."""
    return API_KEY


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
