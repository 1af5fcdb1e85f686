"""Write a tiny ImageFolder of real photos: seeded random crops of scikit-learn's two bundled
photos (china.jpg, flower.jpg), one class per photo. It feeds a 224 px ResNet-18 run for the
benchmarks (the served model's speed does not depend on what it learnt).

    .venv/bin/python scripts/make_photo_folder.py /tmp/photos --per-class 60
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_sample_image


def write_crops(out: Path, per_class: int, seed: int) -> int:
    rng = random.Random(seed)
    for name in ("china.jpg", "flower.jpg"):
        img = Image.fromarray(load_sample_image(name))
        w, h = img.size
        folder = out / name.removesuffix(".jpg")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = rng.uniform(0.4, 0.9) * min(w, h)  # crops of 40-90 % of the shorter side
            cw, ch = int(side * rng.uniform(0.8, 1.2)), int(side)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img.crop((x, y, x + cw, y + ch)).save(folder / f"{i:03d}.jpg", quality=90)
    return 2 * per_class


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to create (CLASS/NNN.jpg)")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"wrote {write_crops(a.out, a.per_class, a.seed)} crops to {a.out}")


if __name__ == "__main__":
    main()
