"""POST /explain on a real ``bentoml serve``: predictions + heatmap (array, PNG overlay), the
class to explain, the 400s (bad class, model without explanations, bad options), the API key,
batching (concurrent requests get their own maps), metrics, and /classify unchanged beside it."""
from __future__ import annotations

import base64
import concurrent.futures
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from service.launcher import start_service
from tests.service.svc_factory import digit_uploads, png_bytes

KEY = "explain-key"


@pytest.fixture(scope="module")
def server(gap_digits_bundle, digits_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc-explain")
    env = {"IMGSERVE_MODELS": f"{gap_digits_bundle},plain={digits_bundle}", "IMGSERVE_API_KEY": KEY}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()


def post(url: str, data: bytes, path: str = "/explain", key: str | None = KEY, **form) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, files={"image": ("x.png", data, "image/png")},
                      data={k: str(v) for k, v in form.items()}, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def digits():
    imgs, labels = digit_uploads(8)
    return [png_bytes(i) for i in imgs], labels


def test_explain_answers_predictions_and_a_heatmap_at_input_size(server, digits):
    data, labels = digits
    r = post(server.url, data[0])
    assert r.status_code == 200, r.text
    body = r.json()
    c = post(server.url, data[0], "/classify").json()
    assert body["predictions"] == c["predictions"]            # same model, same answer as /classify
    assert body["explained"]["index"] == c["predictions"][0]["index"]  # default: the top-1 class
    heat = np.array(body["heatmap"]["values"])
    assert heat.shape == (8, 8) == (body["heatmap"]["height"], body["heatmap"]["width"])
    assert heat.min() == 0.0 and heat.max() == 1.0             # min-max normalised
    assert "overlay_png" not in body["heatmap"]


def test_class_selects_the_map_and_png_overlays_the_original(server, digits):
    data, _ = digits
    top = post(server.url, data[0]).json()
    other = (top["explained"]["index"] + 1) % 10
    r = post(server.url, data[0], **{"class": other, "heatmap": "both", "opacity": 0.7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["explained"]["index"] == other and body["explained"]["label"] == str(other)
    assert body["heatmap"]["values"] != top["heatmap"]["values"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["overlay_png"])))
    assert overlay.size == (24, 24) and overlay.mode == "RGB"  # the uploaded image's size, not the model's
    by_label = post(server.url, data[0], **{"class": str(other)}).json()
    assert by_label["heatmap"]["values"] == body["heatmap"]["values"]


@pytest.mark.parametrize("form, needle", [({"class": 10}, "outside 0..9"), ({"class": "cat"}, "not one of"),
                                          ({"heatmap": "jpeg"}, "heatmap must be"),
                                          ({"opacity": "2"}, "opacity must be")])
def test_bad_options_are_400_saying_why(server, digits, form, needle):
    r = post(server.url, digits[0][0], **form)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_model_without_explanations_is_400_with_the_reason(server, digits):
    r = post(server.url, digits[0][0], model="plain")
    assert r.status_code == 400
    assert "no explanations" in r.json()["error"] and "global average pooling" in r.json()["error"]
    models = httpx.get(server.url + "/models", timeout=10).json()["models"]
    assert {m["name"]: m["explain"]["method"] for m in models} == {"gap": "cam", "plain": None}


def test_explain_needs_the_api_key_and_counts_in_metrics(server, digits):
    assert post(server.url, digits[0][0], key=None).status_code == 401
    assert post(server.url, b"not an image").status_code == 400
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'kind="bad_class"' in text and 'kind="no_explanations"' in text


def test_concurrent_explanations_each_get_their_own_map(server, digits):
    data, _ = digits
    alone = [post(server.url, d).json()["heatmap"]["values"] for d in data]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda d: post(server.url, d).json()["heatmap"]["values"], data * 3))
    assert together == alone * 3


def test_oip_heatmap_is_an_output_requested_by_name(server, digits):
    """OIP infer: 'heatmap' only when asked for, equal to /explain's map for the same pixels; a model
    without explanations answers 400 with the reason."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    doc = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(pixels.shape),
                       "data": pixels.ravel().tolist()}],
           "outputs": [{"name": "heatmap"}, {"name": "probabilities"}]}
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v2/models/gap/infer", json=doc, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert outs["heatmap"]["shape"] == [2, 8, 8] and outs["heatmap"]["datatype"] == "FP32"
    heat = np.array(outs["heatmap"]["data"]).reshape(2, 8, 8)
    png = io.BytesIO()
    Image.fromarray(pixels[1, ..., 0], "L").save(png, format="PNG")
    via_explain = np.array(post(server.url, png.getvalue()).json()["heatmap"]["values"])
    assert np.abs(heat[1] - via_explain).max() <= 5e-5  # /explain rounds to 4 decimals
    plain = httpx.post(server.url + "/v2/models/gap/infer", json={**doc, "outputs": None}, headers=auth, timeout=60)
    assert {o["name"] for o in plain.json()["outputs"]} == {"logits", "probabilities"}
    meta = httpx.get(server.url + "/v2/models/gap", headers=auth, timeout=10).json()
    assert {"name": "heatmap", "datatype": "FP32", "shape": [-1, 8, 8]} in meta["outputs"]
    refused = httpx.post(server.url + "/v2/models/plain/infer", json=doc, headers=auth, timeout=60)
    assert refused.status_code == 400 and "no explanations" in refused.json()["error"], refused.text
