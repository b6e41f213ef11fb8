"""Digit scenes with per-pixel labels: the built-in semantic segmentation dataset.

Scenes made the way detection's are (swinx.detection.scenes: real MNIST digits pasted on dark
canvases, train scenes from the 4,000 training digits and validation scenes from the 1,000
held-out ones), denser and with smaller digits (6-14 of 16-64 px on 256 px: at the 416 px of
the evaluation they are 26-104 px, and a 192 px training crop holds whole digits), written in
the folder convention of ADE20K and mmsegmentation:

    images/{train,val}/NNNNNN.png         RGB scenes
    annotations/{train,val}/NNNNNN.png    8-bit class indices: 0 background, 1 + d for digit d
    classes.json                          {"classes": ["background", "0", ..., "9"], "palette": [[r, g, b], ...]}

A pixel belongs to a digit where that digit's resized ink is above the detection masks' threshold;
a later digit's ink wins where two touch. So a user's own data and the built-in set go through the
same reading code (swinx.segmentation.data).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from swinx.detection.scenes import CLASSES as DIGITS
from swinx.detection.scenes import compose_scene, digit_pools, write_atomic

TRAIN_SCENES = 1500
VAL_SCENES = 200
SCENE_SIZE = 256
DIGITS_PER_SCENE = (6, 14)
DIGIT_SCALE = (16, 64)
CLASSES = ["background", *DIGITS]
# Background black, then ten well-separated colours (matplotlib's tab10).
PALETTE = [
    [0, 0, 0],
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
]
SCENES_VERSION = 1


def _params(train_scenes, val_scenes, size, digits, scale, seed) -> dict:
    return dict(
        train_scenes=int(train_scenes),
        val_scenes=int(val_scenes),
        size=int(size),
        digits=list(digits),
        scale=list(scale),
        seed=int(seed),
        version=SCENES_VERSION,
    )


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def make_scenes(
    out_dir: str | os.PathLike,
    *,
    train_scenes: int = TRAIN_SCENES,
    val_scenes: int = VAL_SCENES,
    size: int = SCENE_SIZE,
    digits: tuple[int, int] = DIGITS_PER_SCENE,
    scale: tuple[int, int] = DIGIT_SCALE,
    seed: int = 0,
) -> Path:
    """Write the digit-scenes segmentation set under `out_dir` (layout above) and return `out_dir`.

    The same arguments give byte-identical files. `scenes.json` (the arguments) is removed first and
    written last, so an interrupted run never looks complete.
    """
    if not (1 <= digits[0] <= digits[1]):
        raise ValueError(f"digits must be (min, max) with 1 <= min <= max, got {digits}")
    if not (1 <= scale[0] <= scale[1] <= size):
        raise ValueError(f"scale must be (min, max) with 1 <= min <= max <= size={size}, got {scale}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenes.json").unlink(missing_ok=True)
    pools = digit_pools()
    for split_index, (split, count) in enumerate((("train", train_scenes), ("val", val_scenes))):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_index, 7]))
        for folder in ("images", "annotations"):
            (out / folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            canvas, instances = compose_scene(rng, pools[split], pools[f"{split}_labels"], size, digits, scale)
            labels = np.zeros((size, size), dtype=np.uint8)
            for inst in instances:
                labels[inst["mask"] > 0] = inst["label"] + 1
            write_atomic(out / "images" / split / f"{i:06d}.png", _png(canvas, "RGB"))
            write_atomic(out / "annotations" / split / f"{i:06d}.png", _png(labels, "L"))
    classes = {"classes": CLASSES, "palette": PALETTE}
    write_atomic(out / "classes.json", json.dumps(classes).encode())
    params = _params(train_scenes, val_scenes, size, digits, scale, seed)
    write_atomic(out / "scenes.json", json.dumps(params).encode())
    return out


def ensure_scenes(out_dir: str | os.PathLike, **kwargs) -> Path:
    """`out_dir` holding the scenes these `make_scenes` arguments make, generating them only if needed."""
    out = Path(out_dir)
    wanted = _params(
        kwargs.get("train_scenes", TRAIN_SCENES),
        kwargs.get("val_scenes", VAL_SCENES),
        kwargs.get("size", SCENE_SIZE),
        kwargs.get("digits", DIGITS_PER_SCENE),
        kwargs.get("scale", DIGIT_SCALE),
        kwargs.get("seed", 0),
    )
    try:
        if json.loads((out / "scenes.json").read_text()) == wanted:
            return out
    except (OSError, ValueError):
        pass
    return make_scenes(out, **kwargs)


def scenes_dir() -> Path:
    """Where the default scenes are written once and reused (generation is deterministic)."""
    return Path.home() / ".cache" / "swinx" / f"digit-segments-v{SCENES_VERSION}"
