"""A newcomer's small image-classification folder: 32x32 colour digits as PNG files in ImageFolder form.

    python benchmarks/make_digit_folder.py OUT [--train-per-class 150] [--val-per-class 30] [--size 32]

Writes OUT/train/<digit>/*.png and OUT/val/<digit>/*.png (1,500 + 300 images by default): each
MNIST digit (the built-in 5,000, train digits for train/, held-out ones for val/) resized to
--size, drawn in a dark random colour on a light random colour with a little noise, so that
the images are RGB, small and not already normalised the MNIST way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from swinx.classification.data import mnist5k


def write_split(images: torch.Tensor, labels: torch.Tensor, per_class: int, out: Path, size: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    written = 0
    for digit in range(10):
        picks = torch.nonzero(labels == digit).flatten()[:per_class]
        (out / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in picks.tolist():
            ink = F.interpolate(images[i][None].float() / 255, size=(size, size), mode="bilinear", align_corners=False)
            ink = ink[0, 0].numpy()[..., None]
            fg, bg = rng.uniform(0, 0.4, 3), rng.uniform(0.55, 1, 3)  # dark ink, light paper, both tinted
            pixels = ink * fg + (1 - ink) * bg + rng.normal(0, 0.04, (size, size, 3))
            Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8)).save(out / str(digit) / f"{i:05d}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--val-per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    train, val, _ = mnist5k()
    n = write_split(train.images, train.labels, args.train_per_class, args.out / "train", args.size, seed=0)
    m = write_split(val.images, val.labels, args.val_per_class, args.out / "val", args.size, seed=1)
    print(f"wrote {n} training and {m} validation images of {args.size}x{args.size} px under {args.out}")


if __name__ == "__main__":
    main()
