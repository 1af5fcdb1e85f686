"""Sanity checks of the maps (Adebayo et al. 2018), on models trained for real on CPU:

- model randomisation: with the last layers' weights re-initialised the map must change (median
  Spearman rank correlation with the trained model's map below 0.5): a map that survives it shows
  the input's edges, not what the model learnt;
- localisation: on a synthetic folder dataset where only a small patch at a random position decides
  the class, the map's peak lies inside the patch for at least 90 % of held-out images.
Both compute the maps as the service does (ONNX features + imgformat.cam), from exported bundles.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from export.bundle import load_model
from export.explain import split_model
from export.wrap import wrap_model
from imgformat.cam import class_activation_maps

SIZE, PATCH = 32, 8


def cams_from_torch(model, ckpt, images, classes):
    """Maps from the PyTorch model through the same numpy CAM as the service (features, weights)."""
    wrapped = wrap_model(model, ckpt["preprocess"])
    split, why = split_model(ckpt["model"]["name"], model)
    assert split is not None, why
    with torch.inference_mode():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * wrapped.scale + wrapped.shift
        feats = split[0](x).numpy()
    return class_activation_maps(feats, split[2].weight.detach().numpy(), classes, images.shape[1], images.shape[2])


def test_randomising_the_last_layers_changes_the_map(gap_digits_run):
    from training.datasets import get_dataset

    ckpt, model = load_model(gap_digits_run / "best.pt")
    ds = get_dataset("digits", seed=0).test
    images = np.ascontiguousarray(ds.images[:64])[..., None] if ds.images.ndim == 3 else ds.images[:64]
    classes = np.asarray(ds.labels[:64])
    trained = cams_from_torch(model, ckpt, images, classes)
    randomised = copy.deepcopy(model)
    torch.manual_seed(1)
    # cascading randomisation from the top: the classifier and the last conv block (conv + BN)
    for layer in (randomised.classifier, randomised.features[-3], randomised.features[-2]):
        layer.reset_parameters()
    randomised.features[-2].reset_running_stats()
    rand = cams_from_torch(randomised.eval(), ckpt, images, classes)
    rho = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(trained, rand)]
    rho = np.nan_to_num(np.asarray(rho), nan=0.0)  # a flat map has no ranks: no correlation
    print(f"randomisation: median Spearman {np.median(rho):.3f}, mean {rho.mean():.3f} over {len(rho)} images")
    assert np.median(rho) < 0.5, f"median Spearman {np.median(rho):.2f} between trained and randomised maps"


def _patch_image(rng, label: int) -> tuple[Image.Image, tuple[int, int]]:
    """Grey noise, and at a random position an 8x8 patch: stripes across (class a) or down (class b)."""
    img = rng.integers(60, 196, size=(SIZE, SIZE), dtype=np.uint8)
    top, left = (int(v) for v in rng.integers(0, SIZE - PATCH + 1, size=2))
    stripes = np.indices((PATCH, PATCH))[0 if label == 0 else 1] % 2
    img[top:top + PATCH, left:left + PATCH] = np.where(stripes, 255, 0).astype(np.uint8)
    return Image.fromarray(img, "L"), (top, left)


def _write_split(root, split: str, n_per_class: int, rng) -> list[tuple[str, int, tuple[int, int]]]:
    rows = []
    for label, name in enumerate(("across", "down")):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            img, where = _patch_image(rng, label)
            path = folder / f"{i:04d}.png"
            img.save(path)
            rows.append((str(path), label, where))
    return rows


@pytest.mark.slow
def test_map_peak_falls_in_the_deciding_patch(tmp_path):
    from export import export_bundle
    from export.backends import ort_session
    from imgformat.bundle import explain_weights, load_bundle
    from training.train import TrainConfig, train

    rng = np.random.default_rng(0)
    data = tmp_path / "patches"
    _write_split(data, "train", 300, rng)
    _write_split(data, "val", 40, rng)
    held_out = _write_split(data, "test", 60, rng)
    run = train(TrainConfig(model="gap_cnn", dataset="folder", data_dir=str(data), epochs=6, batch_size=32,
                            lr=3e-3, augment=False, seed=0, device="cpu", threads=1, progress=False,
                            out=str(tmp_path / "run")))
    bundle = load_bundle(export_bundle(run / "best.pt", tmp_path / "bundle", name="patches", version="1", samples=16))
    sess = ort_session(bundle.path / "model.onnx")
    images = np.stack([np.asarray(Image.open(p))[..., None] for p, _, _ in held_out])
    labels = np.array([label for _, label, _ in held_out])
    logits, feats = sess.run(["logits", "features"], {"image": images})
    assert (logits.argmax(1) == labels).mean() >= 0.9, "the model did not learn the patches"
    heat = class_activation_maps(feats, explain_weights(bundle), labels, SIZE, SIZE)
    inside = []
    for h, (_, _, (top, left)) in zip(heat, held_out):
        y, x = np.unravel_index(np.argmax(h), h.shape)
        inside.append(top <= y < top + PATCH and left <= x < left + PATCH)
    print(f"localisation: accuracy {(logits.argmax(1) == labels).mean():.1%}, peak inside the patch for "
          f"{np.mean(inside):.1%} of {len(inside)} held-out images")
    assert np.mean(inside) >= 0.9, f"peak inside the patch for {np.mean(inside):.0%} of held-out images"
