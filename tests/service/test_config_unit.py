"""The settings parser (service.config) alone: every IMGSERVE_* shape it accepts and refuses."""
from __future__ import annotations

import pytest

from service.cpus import cpu_count
from service.config import ConfigError, Settings, load_settings, parse_models


def test_defaults() -> None:
    s = load_settings({})
    assert (s.backend, s.precision, s.device, s.batcher, s.workers) == ("onnx", "fp32", "auto", "eager", 1)
    assert (s.max_batch_size, s.max_queue, s.max_images, s.max_pixels) == (32, 512, 64, 40_000_000)
    assert s.threads == cpu_count() and not s.threads_explicit and not s.allow_unchecked
    assert [(m.name, m.location, m.store) for m in s.models] == [(None, "bundles/default", False)]


@pytest.mark.parametrize("spec,want", [
    ("b", [(None, "b", False)]),
    (" a=dir/x , ,store:m:1 ", [("a", "dir/x", False), (None, "m:1", True)]),
    ("n=store:tag:latest", [("n", "tag:latest", True)]),
    ("x=a=b", [("x=a", "b", False)]),  # the last '=' separates name and location
])
def test_parse_models(spec: str, want: list) -> None:
    assert [(m.name, m.location, m.store) for m in parse_models(spec)] == want


def test_parse_models_with_version_labels() -> None:
    got = parse_models("digits@v1=bundles/a,digits@v2=store:d:2,bundles/c")
    assert [(m.name, m.version, m.location, m.store) for m in got] == [
        ("digits", "v1", "bundles/a", False), ("digits", "v2", "d:2", True), (None, None, "bundles/c", False)]
    for bad in ("@v1=bundles/a", "digits@=bundles/a"):
        with pytest.raises(ConfigError, match="NAME@VERSION=LOCATION"):
            parse_models(bad)


@pytest.mark.parametrize("env,msg", [
    ({"IMGSERVE_MODELS": " , "}, "IMGSERVE_MODELS is empty"),
    ({"IMGSERVE_MAX_BATCH_SIZE": "1"}, "IMGSERVE_MAX_BATCH_SIZE=1 must be >= 2"),
    ({"IMGSERVE_MAX_QUEUE": "0"}, "must be >= 1"),
    ({"IMGSERVE_THREADS": "2.5"}, "not an integer"),
    ({"IMGSERVE_PRECISION": "bf16"}, "fp32, int8, fp16"),
    ({"IMGSERVE_DEVICE": "tpu"}, "auto, cpu, cuda"),
    ({"IMGSERVE_ALLOW_UNCHECKED": "maybe"}, "IMGSERVE_ALLOW_UNCHECKED='maybe' is not valid"),
    ({"IMGSERVE_API_KEY": "k", "IMGSERVE_API_KEY_FILE": "/x"}, "not both"),
    ({"IMGSERVE_API_KEY_FILE": "/nonexistent/key"}, "cannot be read"),
])
def test_bad_values_name_the_variable(env: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load_settings(env)


@pytest.mark.parametrize("raw,want", [("1", True), ("true", True), ("YES", True), ("0", False), ("no", False),
                                      ("", False)])
def test_allow_unchecked_is_a_boolean(raw: str, want: bool) -> None:
    assert load_settings({"IMGSERVE_ALLOW_UNCHECKED": raw}).allow_unchecked is want


def test_threads_and_workers() -> None:
    s = load_settings({"IMGSERVE_THREADS": "3"})
    assert s.threads == 3 and s.threads_explicit
    s = load_settings({"IMGSERVE_WORKERS": "cores"})
    assert s.workers == cpu_count() and s.threads == max(1, cpu_count() // s.workers)


def test_api_key_file_is_read_and_never_shown(tmp_path) -> None:
    f = tmp_path / "key"
    f.write_text("  hunter2\n")
    s = load_settings({"IMGSERVE_API_KEY_FILE": str(f)})
    assert s.api_key == "hunter2" and "hunter2" not in repr(s) and isinstance(s, Settings)


def test_tracing_switch_excludes_what_it_says() -> None:
    """OpenTelemetry matches excluded_urls anywhere in the full URL: "/" excluded everything. Off
    (default) excludes every URL on purpose; on excludes only the probes and /metrics."""
    from opentelemetry.util.http import ExcludeList

    from service.service import TRACED_NONE, TRACED_NOT

    off, on = ExcludeList(TRACED_NONE), ExcludeList(TRACED_NOT)
    for path in ("/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert on.url_disabled(f"http://127.0.0.1:3000{path}") and off.url_disabled(f"http://127.0.0.1:3000{path}")
    for path in ("/classify", "/v2/models/digits/infer", "/", "/v2/repository/index", "/livez-not", "/metrics/x"):
        assert not on.url_disabled(f"http://127.0.0.1:3000{path}"), path
        assert off.url_disabled(f"http://127.0.0.1:3000{path}"), path
