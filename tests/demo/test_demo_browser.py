"""The demo page in a real browser (headless Chromium via Selenium) against a real `bentoml serve`:
what the page shows is what POST /classify answers for the same file. Screenshots go to
test-artifacts/demo/."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from loadtests.payloads import fashion_pngs, sample_photo_path

WAIT_S = 60


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A Fashion-MNIST test PNG (an ankle boot), scikit-learn's china.jpg, and a text file."""
    d = tmp_path_factory.mktemp("uploads")
    boot = next(p for p in fashion_pngs(20) if p.true_label == "Ankle boot")
    (d / "boot.png").write_bytes(boot.data)
    (d / "china.jpg").write_bytes(Path(sample_photo_path("china")).read_bytes())
    (d / "notes.txt").write_text("not an image\n")
    return {"png": d / "boot.png", "jpeg": d / "china.jpg", "text": d / "notes.txt"}


def api_answer(url: str, path: Path, model: str, top_k: int, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/classify", files={"image": (path.name, path.read_bytes())},
                      data={"model": model, "top_k": str(top_k)}, headers=headers, timeout=60)


def upload(browser, path: Path, outcome: str) -> None:
    """Choose `path` in the page's file input and wait for its answer: outcome 'result' or 'error'."""
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, WAIT_S).until(ec.visibility_of_element_located(
        (By.CSS_SELECTOR, f'#{outcome}[data-file="{path.name}"]')))


def rendered(browser) -> dict:
    rows = browser.find_elements(By.CSS_SELECTOR, "#predictions li")
    return {"model": browser.find_element(By.ID, "result-model").text,
            "version": browser.find_element(By.ID, "result-version").text,
            "rtt": browser.find_element(By.ID, "rtt").text,
            "labels": [r.find_element(By.CLASS_NAME, "label").text for r in rows],
            "scores": [r.find_element(By.CLASS_NAME, "score").text for r in rows]}


def open_demo(browser, url: str) -> None:
    browser.get(url + "/demo")
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))


def outside_loads(browser, url: str) -> list[str]:
    """Every resource the page loaded (Resource Timing) that did not come from the server itself."""
    names = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    origin = urlsplit(url)
    return [n for n in names if urlsplit(n).scheme not in ("blob", "data") and urlsplit(n).netloc != origin.netloc]


def test_demo_shows_what_classify_answers(browser, demo_server, files, artifacts) -> None:
    url = demo_server.url
    browser.set_window_size(1100, 900)
    browser.get(url + "/")
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.ID, "origin").text == url)
    browser.save_screenshot(str(artifacts / "landing.png"))
    assert outside_loads(browser, url) == []
    browser.find_element(By.CSS_SELECTOR, 'a[href="/demo"]').click()
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
    models = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
    assert models == ["fashion", "digits"], models
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "fashion"
    assert not browser.find_element(By.ID, "key-row").is_displayed(), "no API key is configured"
    assert not browser.find_element(By.ID, "version-row").is_displayed(), "one version each: nothing to pick"

    for kind in ("png", "jpeg"):
        upload(browser, files[kind], "result")
        shown = rendered(browser)
        api = api_answer(url, files[kind], "fashion", 5)
        assert api.status_code == 200, api.text
        want = api.json()
        browser.save_screenshot(str(artifacts / f"demo-{kind}.png"))
        print(f"\n{files[kind].name}: page top-1 {shown['labels'][0]!r} {shown['scores'][0]}, "
              f"API top-1 {want['predictions'][0]['label']!r} {want['predictions'][0]['score']:.3f}, "
              f"round trip {shown['rtt']}")
        assert shown["labels"][0] == want["predictions"][0]["label"], (shown, want)
        assert shown["labels"] == [p["label"] for p in want["predictions"]], (shown, want)
        assert shown["scores"][0] == f"{want['predictions'][0]['score'] * 100:.1f} %", (shown, want)
        assert (shown["model"], shown["version"]) == (want["model"], want["version"]) == ("fashion", "1")
        assert shown["rtt"].endswith(" ms") and float(shown["rtt"][:-3]) >= 0, shown
        assert browser.find_element(By.ID, "preview").is_displayed(), f"no preview of {files[kind].name}"
    assert shown["labels"][0] != "" and rendered(browser)["labels"][0] == shown["labels"][0]

    # A file that is no image: the service's own message, not a result.
    upload(browser, files["text"], "error")
    api = api_answer(url, files["text"], "fashion", 5)
    assert 400 <= api.status_code < 500, api.text
    message = browser.find_element(By.ID, "error").text
    browser.save_screenshot(str(artifacts / "demo-error.png"))
    print(f"notes.txt: page shows {message!r}")
    assert message == f"HTTP {api.status_code}: {api.json()['error']}", message
    assert not browser.find_element(By.ID, "result").is_displayed()

    # The other model, picked in the list: its answer for the same boot.
    Select(browser.find_element(By.ID, "model")).select_by_value("digits")
    upload(browser, files["png"], "result")
    shown = rendered(browser)
    want = api_answer(url, files["png"], "digits", 5).json()
    assert shown["model"] == "digits" and shown["labels"] == [p["label"] for p in want["predictions"]], (shown, want)

    assert outside_loads(browser, url) == [], "the page loaded something from outside the server"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/classify" not in e["message"]]
    assert errors == [], errors  # the failed upload's 4xx is logged by Chromium; nothing else may fail


def test_demo_overlays_the_heatmap_with_an_opacity_slider(browser, demo_server, files, artifacts) -> None:
    """fashion (gap_cnn) explains: the overlay of its top-1 class, the slider sets the heatmap's
    opacity; digits (simple_cnn) does not, and the page says why."""
    url = demo_server.url
    open_demo(browser, url)
    upload(browser, files["png"], "explain")
    want = api_answer(url, files["png"], "fashion", 5).json()
    top = want["predictions"][0]
    assert browser.find_element(By.ID, "explained").text == f"{top['label']} ({top['score'] * 100:.1f} %)"
    heat = browser.find_element(By.ID, "explain-heat")
    WebDriverWait(browser, WAIT_S).until(lambda b: b.execute_script("return arguments[0].naturalWidth", heat) == 28)
    assert heat.value_of_css_property("opacity") == "0.5"
    slider = browser.find_element(By.ID, "opacity")
    browser.execute_script("arguments[0].value = 80; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert heat.value_of_css_property("opacity") == "0.8"
    browser.save_screenshot(str(artifacts / "demo-explain.png"))
    Select(browser.find_element(By.ID, "model")).select_by_value("digits")
    WebDriverWait(browser, WAIT_S).until(ec.visibility_of_element_located((By.ID, "explain-none")))
    assert "global average pooling" in browser.find_element(By.ID, "explain-none").text
    assert not browser.find_element(By.ID, "explain").is_displayed()
    assert outside_loads(browser, url) == []


def test_demo_shows_which_version_answered(browser, canary_server, files, artifacts) -> None:
    """digits served as v1 and v2, the policy sends everything to v2: the page says v2 answered and
    that the policy picked it; with v1 picked in the version list, v1 answers, as the API says."""
    url = canary_server.url
    open_demo(browser, url)
    assert [o.text for o in Select(browser.find_element(By.ID, "model")).options] == ["digits (versions v1, v2)"]
    versions = Select(browser.find_element(By.ID, "version"))
    assert [o.text for o in versions.options] == ["any: traffic policy (v1 0 %, v2 100 %)", "v1", "v2"]
    upload(browser, files["png"], "result")
    api = api_answer(url, files["png"], "digits", 5)
    assert api.headers["x-model-version"] == api.json()["version"] == "v2"
    shown = rendered(browser)
    assert (shown["model"], shown["version"]) == ("digits", "v2"), shown
    route = browser.find_element(By.ID, "result-route").text
    assert route == "(picked by the traffic policy: v1 0 %, v2 100 %)", route
    browser.save_screenshot(str(artifacts / "demo-version-policy.png"))

    versions.select_by_value("v1")
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.ID, "result-version").text == "v1")
    WebDriverWait(browser, WAIT_S).until(ec.visibility_of_element_located((By.ID, "result")))
    pinned = httpx.post(url + "/classify", files={"image": (files["png"].name, files["png"].read_bytes())},
                        data={"model": "digits", "version": "v1", "top_k": "5"}, timeout=60)
    assert pinned.json()["version"] == pinned.headers["x-model-version"] == "v1"
    assert rendered(browser)["labels"] == [p["label"] for p in pinned.json()["predictions"]]
    assert browser.find_element(By.ID, "result-route").text == "(the version asked for)"
    browser.save_screenshot(str(artifacts / "demo-version-pinned.png"))
    assert outside_loads(browser, url) == []


def test_demo_at_phone_width(browser, demo_server, files, artifacts) -> None:
    browser.set_window_size(390, 844)  # a phone in portrait
    try:
        open_demo(browser, demo_server.url)
        upload(browser, files["jpeg"], "result")
        browser.save_screenshot(str(artifacts / "demo-phone.png"))
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a 390 px screen"
        bar = browser.find_element(By.CSS_SELECTOR, "#predictions li .bar")
        assert bar.size["width"] > 50, f"score bars squeezed to {bar.size['width']} px"
    finally:
        browser.set_window_size(1100, 900)


def test_api_key_field(browser, keyed_server, api_key, files, artifacts) -> None:
    open_demo(browser, keyed_server.url)
    WebDriverWait(browser, WAIT_S).until(ec.visibility_of_element_located((By.ID, "key")))
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys("wrong-key")
    upload(browser, files["png"], "error")
    api = api_answer(keyed_server.url, files["png"], "digits", 5, {"Authorization": "Bearer wrong-key"})
    assert api.status_code == 401
    assert browser.find_element(By.ID, "error").text == f"HTTP 401: {api.json()['error']}"
    browser.save_screenshot(str(artifacts / "demo-key-refused.png"))
    key.clear()
    key.send_keys(api_key)
    browser.find_element(By.ID, "again").click()
    WebDriverWait(browser, WAIT_S).until(ec.visibility_of_element_located((By.ID, "result")))
    want = api_answer(keyed_server.url, files["png"], "digits", 5, {"Authorization": f"Bearer {api_key}"}).json()
    assert rendered(browser)["labels"] == [p["label"] for p in want["predictions"]]
    assert outside_loads(browser, keyed_server.url) == []


def test_swagger_ui_without_the_tracker(browser, demo_server, artifacts) -> None:
    browser.get(demo_server.url + "/docs")
    WebDriverWait(browser, WAIT_S).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 3)
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    browser.save_screenshot(str(artifacts / "docs.png"))
    assert {"/classify", "/classify_batch", "/models"} <= paths, paths
    assert outside_loads(browser, demo_server.url) == []
