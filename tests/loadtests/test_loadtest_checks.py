"""The locustfile's body checks accept good answers and reject wrong ones; payloads are real images."""
from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
from PIL import Image

from loadtests import checks
from loadtests.checks import BodyError, ModelInfo

NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MODELS = {"fmnist": ModelInfo("fmnist", NAMES, "1"), "other": ModelInfo("other", ("a", "b", "c"), "2")}


def good_body(k: int = 3) -> dict:
    scores = [0.7, 0.2, 0.05, 0.03, 0.01][:k]
    idx = [9, 7, 5, 0, 1][:k]
    return {"model": "fmnist", "version": "1",
            "predictions": [{"label": NAMES[i], "index": i, "score": s} for i, s in zip(idx, scores)]}


def check(body, *, top_k=3, known="Ankle boot", requested="fmnist"):
    return checks.check_classify_body(body, models=MODELS, requested=requested, default="fmnist",
                                      top_k=top_k, known_label=known)


def test_good_body_passes():
    assert check(good_body()).name == "fmnist"
    assert check(good_body(5), top_k=5, requested=None).name == "fmnist"


def test_top_k_larger_than_classes_is_capped():
    body = {"model": "other", "version": "2", "predictions": [
        {"label": "b", "index": 1, "score": 0.5}, {"label": "a", "index": 0, "score": 0.3},
        {"label": "c", "index": 2, "score": 0.2}]}
    checks.check_classify_body(body, models=MODELS, requested="other", default="fmnist", top_k=5)


def _mutate(path_fn):
    body = good_body()
    path_fn(body)
    return body


@pytest.mark.parametrize("mutate, kind", [
    (lambda b: b["predictions"][0].update(label="Bag", index=8), "wrong_label"),        # known image, wrong answer
    (lambda b: b["predictions"][0].update(score=1.2), "bad_score"),                          # a score above 1
    (lambda b: b["predictions"][1].update(score=0.6), "scores_sum"),                         # sum 1.35 > 1, still sorted
    (lambda b: b["predictions"].pop(), "wrong_top_k"),                                       # 2 answers for top_k 3
    (lambda b: b["predictions"].append({"label": "Bag", "index": 8, "score": 0.0}), "wrong_top_k"),
    (lambda b: b["predictions"][1].pop("label"), "no_label"),
    (lambda b: b["predictions"][1].update(label="Bag"), "label_index_mismatch"),
    (lambda b: b["predictions"][1].update(index=42), "bad_index"),
    (lambda b: b["predictions"].reverse(), "not_sorted"),
    (lambda b: b.update(model="other"), "wrong_model"),
    (lambda b: b.update(version="7"), "wrong_version"),
    (lambda b: b.pop("predictions"), "no_predictions"),
], ids=["label", "score>1", "sum>1", "short", "long", "no-label", "mismatch", "index", "order", "model", "version",
        "missing"])
def test_wrong_bodies_are_rejected(mutate, kind):
    with pytest.raises(BodyError) as e:
        check(_mutate(mutate))
    assert e.value.kind == kind, f"expected {kind}, got {e.value}"


def test_scores_rounding_slack_is_accepted():
    body = good_body(2)
    body["predictions"][0]["score"] = 0.80004
    body["predictions"][1]["score"] = 0.2
    check(body, top_k=2)


def test_batch_body_order_and_length():
    items = [good_body(), copy.deepcopy(good_body())]
    checks.check_batch_body({"results": items}, models=MODELS, requested="fmnist", default="fmnist",
                            top_k=3, known_labels=["Ankle boot", None])
    with pytest.raises(BodyError, match="wrong_batch_length"):
        checks.check_batch_body(items, models=MODELS, requested="fmnist", default="fmnist", top_k=3,
                                known_labels=["Ankle boot"])
    with pytest.raises(BodyError, match="wrong_label"):   # second image's known label differs
        checks.check_batch_body(items, models=MODELS, requested="fmnist", default="fmnist", top_k=3,
                                known_labels=["Ankle boot", "Bag"])


def test_error_bodies():
    checks.check_error_body(404, {"error": "unknown model 'x'; served: fmnist"}, frozenset({404}))
    for status, body, kind in [(200, {"model": "fmnist"}, "bad_input_accepted"), (500, {"error": "boom"}, "wrong_error_status"),
                               (400, "plain text", "no_error_message")]:
        with pytest.raises(BodyError) as e:
            checks.check_error_body(status, body, frozenset({400}))
        assert e.value.kind == kind


def test_parse_models_shapes():
    listed = {"models": [{"name": "fmnist", "version": "1", "class_names": list(NAMES), "default": True}]}
    models, default = checks.parse_models(listed)
    assert default == "fmnist" and models["fmnist"].num_classes == 10
    keyed, _ = checks.parse_models({"models": {"fmnist": {"classes": list(NAMES)}}})
    assert keyed["fmnist"].class_names == NAMES
    with pytest.raises(BodyError):
        checks.parse_models({"models": []})


def test_payloads_are_real_decodable_images():
    from loadtests.payloads import load_payloads

    p = load_payloads()
    assert len(p.small) >= 10 and len(p.photos) == 8
    sizes = {max(Image.open(io.BytesIO(x.data)).size) for x in p.photos}
    assert sizes == {300, 640, 1000, 2000}, sizes
    for x in p.small[:3]:
        assert Image.open(io.BytesIO(x.data)).size == (28, 28)
    assert {b.name for b in p.bad} >= {"not_image", "truncated_jpeg", "unknown_model", "pixel_bomb_png"}


def test_locustfile_imports_and_builds_multipart():
    # In a child process: importing locust monkey-patches ssl with gevent, which recurses forever
    # once another test module (selenium, tritonclient) has imported ssl in this process.
    child = subprocess.run([sys.executable, "-c", "import loadtests.locustfile"], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]  # imports cleanly: no service needed at import time
    from loadtests.payloads import multipart

    body, ctype = multipart({"top_k": "3"}, [("image", ("a.png", b"\x89PNG", "image/png"))])
    assert ctype.startswith("multipart/form-data; boundary=")
    assert b'name="top_k"\r\n\r\n3\r\n' in body and b'filename="a.png"' in body


def test_failure_kind_unwraps_locust_errors():
    from loadtests.summary import failure_kind

    assert failure_kind("CatchResponseError('wrong_label')") == "wrong_label"
    assert failure_kind("ConnectionRefusedError(111, 'Connection refused')").startswith("ConnectionRefusedError")


def test_parse_duration():
    import argparse

    from loadtests.run import parse_duration

    assert [parse_duration(t) for t in ("30s", "2m", "1h30m", "45")] == [30, 120, 5400, 45]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("30 seconds")


def test_profile_aggregates_folded_stacks(tmp_path):
    from loadtests.profile import aggregate

    f = tmp_path / "raw.txt"
    f.write_text("run (asyncio/base_events.py:1);Session.run (onnxruntime/capi/x.py:3) 6\n"
                 "run (asyncio/base_events.py:1);ImageFile.load (PIL/ImageFile.py:425) 3\n"
                 "run (asyncio/base_events.py:1);send (h11/_connection.py:9) 1\n"
                 "run (uvicorn/protocols/http/httptools_impl.py:9);__call__ (service/route.py:60);"
                 "observe (prometheus_client/metrics.py:1) 2\n")
    stages, leaves, total, layers = aggregate([f])
    assert total == 12 and stages["onnxruntime run"] == 6 and stages["decode (PIL load)"] == 3, stages
    assert stages["bentoml / http"] == 1 and leaves["Session.run (onnxruntime/capi/x.py:3)"] == 6
    # by layer, the innermost matching frame wins: the metrics call counts as metrics, not as the route
    assert layers["onnxruntime"] == 6 and layers["decode + preprocess (PIL)"] == 3, layers
    assert layers["metrics (prometheus_client)"] == 2 and layers["event loop, threads"] == 1, layers


def test_stage_means_from_prometheus_text():
    from loadtests.bench import stage_means

    before = 'imgserve_preprocess_seconds_sum{model="m"} 1.0\nimgserve_preprocess_seconds_count{model="m"} 100\n'
    after = 'imgserve_preprocess_seconds_sum{model="m"} 1.5\nimgserve_preprocess_seconds_count{model="m"} 200\n'
    assert stage_means(before, after) == {"preprocess": 5.0}
