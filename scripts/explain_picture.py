"""docs/explain.png: held-out Fashion-MNIST images, each beside its class-activation overlay for the
predicted class, computed as the service does (the bundle's ONNX 'features' output + imgformat.cam).

  .venv/bin/python scripts/explain_picture.py bundles/default docs/explain.png
"""
from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image, ImageDraw

from imgformat.bundle import explain_weights, load_bundle
from imgformat.cam import class_activation_maps, overlay_png
from training.datasets import get_dataset

SCALE, PER_ROW = 6, 4


def main(bundle_dir: str, out: str) -> None:
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    sess = ort.InferenceSession(str(bundle.model_file("onnx", "fp32")), providers=["CPUExecutionProvider"])
    test = get_dataset("fashion-mnist", seed=0).test
    picks = [next(i for i, y in enumerate(test.labels) if y == c) for c in (9, 7, 1, 8, 0, 5, 3, 2)]
    images = np.stack([np.asarray(test.images[i], dtype=np.uint8) for i in picks])[..., None]
    logits, feats = sess.run(["logits", "features"], {"image": images})
    pred = logits.argmax(1)
    heat = class_activation_maps(feats, explain_weights(bundle), pred, 28, 28)
    names = bundle.manifest["class_names"]
    tile = 28 * SCALE
    sheet = Image.new("RGB", (PER_ROW * 2 * tile, (len(picks) // PER_ROW) * (tile + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, h, p) in enumerate(zip(images, heat, pred)):
        big = Image.fromarray(img[..., 0], "L").resize((tile, tile), Image.NEAREST)
        over = Image.open(io.BytesIO(overlay_png(big, h, (0, 0, tile, tile), 0.5)))
        x, y = (k % PER_ROW) * 2 * tile, (k // PER_ROW) * (tile + 16)
        sheet.paste(big.convert("RGB"), (x, y))
        sheet.paste(over, (x + tile, y))
        draw.text((x + 4, y + tile + 2), f"predicted: {names[p]}", fill="black")
    sheet.save(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
