"""docs/training.md's "Adding a model" example works as written: register, train, export."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.models import registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def doc_example() -> str:
    """The first ```python block under the page's "## Adding a model" heading."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Adding a model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "docs/training.md lost its 'Adding a model' example"
    return blocks[0]


@pytest.fixture
def registered(monkeypatch) -> str:
    """Run the page's code with a private copy of the registry, so other tests never see the model."""
    monkeypatch.setattr(registry._MODELS, "_entries", dict(registry._MODELS._entries))
    before = set(registry.list_models())
    exec(compile(doc_example(), str(DOC), "exec"), {"__name__": "doc_example"})
    added = set(registry.list_models()) - before
    assert len(added) == 1, f"the example should register one model, it registered {sorted(added)}"
    return added.pop()


def test_the_documented_model_trains_and_exports(registered, tmp_path):
    from export import export_bundle
    from imgformat.bundle import load_manifest
    from training.train import TrainConfig, train

    assert registered in registry.list_models()
    run = train(TrainConfig(model=registered, dataset="digits", epochs=3, batch_size=32, optimizer="adam", lr=3e-3,
                            scheduler="none", augment=False, seed=0, device="cpu", threads=1, progress=False,
                            out=str(tmp_path / "run")))
    bundle = export_bundle(run / "best.pt", tmp_path / "bundle", name="tiny", version="1", samples=16)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_acc"] > 0.5, metrics["test_acc"]  # it learnt (10 classes: chance is 0.1)
    manifest = load_manifest(bundle)
    assert manifest["architecture"]["name"] == registered
    assert manifest["parity"]["passed"] is True
