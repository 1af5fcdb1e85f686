"""loadtests.jpeg_decoders compares like with like: the swapped decoder gives the served model inputs."""
import pytest

pytest.importorskip("simplejpeg")

from loadtests.jpeg_decoders import MODELS, odd_jpegs, photos, pipelines, max_diff  # noqa: E402


def test_simplejpeg_pipeline_gives_the_served_model_inputs():
    china = next(iter(photos().values()))
    for spec in MODELS.values():
        served, turbo = pipelines(spec)
        for data in [china, *odd_jpegs().values()]:
            assert max_diff(served(data), turbo(data)) == 0
