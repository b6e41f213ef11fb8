"""What every task's data shares: decoding any image file, and never failing mid-epoch on one.

A file that cannot be decoded becomes an `Unreadable` marker; `SkippingCollate` drops it from
the batch and hands it back, and the engine counts and reports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Sampler, default_collate

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """The data a user pointed at cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a sample whose file could not be decoded."""

    path: str
    reason: str


def open_image(path: str | os.PathLike, channels: int) -> Image.Image:
    """Decode any Pillow format to "L" (channels=1) or "RGB" (channels=3).

    Transparent images (RGBA, LA, palette with transparency) are composited over white, the
    way a browser shows them; grayscale becomes RGB by repetition and colour becomes gray by
    ITU-R 601 luma.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return image.convert("L" if channels == 1 else "RGB")


# What Pillow raises on a file that is not an image, is cut short, or is malformed inside.
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class SkippingCollate:
    """Collate that drops `Unreadable` samples and hands them back beside the batch."""

    def __call__(self, samples):
        good = [s for s in samples if not isinstance(s, Unreadable)]
        bad = [s for s in samples if isinstance(s, Unreadable)]
        return (default_collate(good) if good else None), bad


class ShardSampler(Sampler[int]):
    """Evaluation shard of rank `rank`: indices rank, rank + world, ... (no padding, no repeats)."""

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.indices = range(rank, length, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
