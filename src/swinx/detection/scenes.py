"""Digit scenes: the built-in detection dataset, made from the real handwritten MNIST digits.

Each scene is a dark RGB canvas with a few digits pasted at random sizes and positions; every
digit is one instance of class "0".."9" with a pixel mask and a tight box. The result is an
ordinary COCO instances dataset on disk, so the built-in set and a user's own data go through
exactly the same reading code (`swinx.detection.data`).

Train scenes are made only from the 4,000 training digits of `mnist5k()` and validation scenes
only from its 1,000 held-out digits, so validation measures generalisation to unseen writing.
Each image records which source digits it used (`images[i]["digits"]`, `annotations[j]["source_index"]`).
"""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Defaults sized for a small detector trained from scratch on a 2-core CPU in about ten minutes:
# 256 px canvases keep a forward/backward cheap, and 20-80 px digits span small to large objects.
TRAIN_SCENES = 1500
VAL_SCENES = 200
SCENE_SIZE = 256
DIGITS_PER_SCENE = (3, 8)
DIGIT_SCALE = (20, 80)
# A resized digit pixel above this (of 255) belongs to the instance mask; below it is anti-aliased fringe.
MASK_THRESHOLD = 64
# Digits are mirrored-asymmetric, so horizontal flips make images the validation set never shows.
SCENE_HFLIP = 0.0
CLASSES = [str(d) for d in range(10)]

MAX_IOU = 0.1  # a new digit's box may overlap an earlier one this much (IoU) ...
MAX_COVER = 0.3  # ... and cover at most this fraction of the smaller box (IoU misses a small box inside a big one)
PLACEMENT_TRIES = 30
SCENES_VERSION = 1


@functools.lru_cache(maxsize=1)
def digit_pools() -> dict[str, np.ndarray]:
    """{"train": (4000, 28, 28) uint8, "val": (1000, 28, 28) uint8}: the two disjoint halves of mnist5k."""
    from swinx.classification.data import mnist5k

    train, val, _ = mnist5k()
    return {
        "train": train.images[:, 0].numpy(),
        "val": val.images[:, 0].numpy(),
        "train_labels": train.labels.numpy(),
        "val_labels": val.labels.numpy(),
    }


def digit_sprite(digit: np.ndarray, side: int) -> np.ndarray:
    """The digit (28, 28) uint8 cropped to its ink and resized (bilinear) so its longer side is `side`.

    Returns (h, w) uint8 with max(h, w) == side; the aspect ratio is kept, so a "1" stays thin.
    """
    rows, cols = np.nonzero(digit)
    crop = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    ch, cw = crop.shape
    h, w = (side, max(1, round(cw * side / ch))) if ch >= cw else (max(1, round(ch * side / cw)), side)
    return np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR))


def _box_iou_cover(box: np.ndarray, others: list[np.ndarray]) -> tuple[float, float]:
    """Largest IoU and largest intersection/smaller-area of an xyxy box against a list of xyxy boxes."""
    if not others:
        return 0.0, 0.0
    o = np.stack(others)
    iw = np.clip(np.minimum(box[2], o[:, 2]) - np.maximum(box[0], o[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], o[:, 3]) - np.maximum(box[1], o[:, 1]), 0, None)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (o[:, 2] - o[:, 0]) * (o[:, 3] - o[:, 1])
    return float((inter / (area + areas - inter)).max()), float((inter / np.minimum(area, areas)).max())


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32: a dark, smooth, slightly coloured field plus sparse speckles.

    Smooth rather than per-pixel noise, so the PNGs stay small (per-pixel noise does not compress).
    """
    level = rng.uniform(5, 40)
    low = (rng.uniform(0, 1, (6, 6, 3)) * level).astype(np.uint8)
    field = np.asarray(Image.fromarray(low, "RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    n = int(rng.integers(0, 150))
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    field[ys, xs] = rng.uniform(20, 90, (n, 1))
    return field


def compose_scene(
    rng: np.random.Generator,
    pool: np.ndarray,
    labels: np.ndarray,
    size: int,
    digits: tuple[int, int],
    scale: tuple[int, int],
) -> tuple[np.ndarray, list[dict]]:
    """One canvas (size, size, 3) uint8 and its instances: dicts of mask (size, size) uint8, label, provenance."""
    canvas = _background(rng, size)
    instances, boxes = [], []
    for _ in range(int(rng.integers(digits[0], digits[1] + 1))):
        index = int(rng.integers(len(pool)))
        sprite = digit_sprite(pool[index], int(rng.integers(scale[0], scale[1] + 1)))
        local = sprite > MASK_THRESHOLD
        if not local.any():
            continue
        rows, cols = np.nonzero(local)
        tight = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)
        h, w = sprite.shape
        for _ in range(PLACEMENT_TRIES):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = tight + (x, y, x, y)
            iou, cover = _box_iou_cover(box, boxes)
            if iou <= MAX_IOU and cover <= MAX_COVER:
                break
        else:
            continue  # no room left for this digit: the scene keeps fewer digits
        tint = rng.uniform(0.7, 1.0, 3).astype(np.float32)
        region = canvas[y : y + h, x : x + w]
        # Max-compositing keeps both strokes visible where boxes touch, so each mask stays the digit's own ink.
        np.maximum(region, sprite[..., None].astype(np.float32) * tint, out=region)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[y : y + h, x : x + w] = local
        boxes.append(box)
        instances.append(
            dict(mask=mask, box=box, label=int(labels[index]), source_index=index, paste_xy=[x, y], sprite_hw=[h, w])
        )
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), instances


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _params(train_scenes, val_scenes, size, digits, scale, seed) -> dict:
    return dict(
        train_scenes=int(train_scenes),
        val_scenes=int(val_scenes),
        size=int(size),
        digits=list(digits),
        scale=list(scale),
        seed=int(seed),
        mask_threshold=MASK_THRESHOLD,
        version=SCENES_VERSION,
    )


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
    """Write a COCO digit-scenes dataset under `out_dir` and return `out_dir`.

    Layout: `train/*.png`, `val/*.png` (size x size RGB), `annotations/instances_{train,val}.json`
    with RLE masks, xywh boxes (the tight boxes of the masks), area = mask pixel count and
    categories 1..10 named "0".."9". The same arguments give byte-identical files. Existing
    annotation files are removed first and written last, so an interrupted run never looks complete.
    """
    if not (1 <= digits[0] <= digits[1]):
        raise ValueError(f"digits must be (min, max) with 1 <= min <= max, got {digits}")
    if not (1 <= scale[0] <= scale[1] <= size):
        raise ValueError(f"scale must be (min, max) with 1 <= min <= max <= size={size}, got {scale}")
    out = Path(out_dir)
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (ann_dir / f"instances_{split}.json").unlink(missing_ok=True)
    pools = digit_pools()
    params = _params(train_scenes, val_scenes, size, digits, scale, seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "digit"} for i, name in enumerate(CLASSES)]
    documents = {}
    for split_index, (split, count) in enumerate((("train", train_scenes), ("val", val_scenes))):
        # One stream per split: changing the number of train scenes leaves the val scenes as they were.
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_index]))
        (out / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            canvas, instances = compose_scene(rng, pools[split], pools[f"{split}_labels"], size, digits, scale)
            file_name = f"{i:06d}.png"
            buffer = io.BytesIO()
            # Level 3 encodes about twice as fast as the default 6 for files ~10% larger.
            Image.fromarray(canvas, "RGB").save(buffer, format="PNG", compress_level=3)
            write_atomic(out / split / file_name, buffer.getvalue())
            image_id = i + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": size,
                    "height": size,
                    "digit_pool": split,
                    "digits": [inst["source_index"] for inst in instances],
                }
            )
            for inst in instances:
                rle = mask_utils.encode(np.asfortranarray(inst["mask"]))
                x0, y0, x1, y1 = (float(v) for v in inst["box"])
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": inst["label"] + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int(inst["mask"].sum()),
                        "iscrowd": 0,
                        "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                        "source_index": inst["source_index"],
                        "paste_xy": inst["paste_xy"],
                        "sprite_hw": inst["sprite_hw"],
                    }
                )
        documents[split] = {
            "info": {
                "description": f"swinx digit scenes ({split}), from the mnist5k {split} digits",
                "swinx_scenes": dict(params, split=split),
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
    for split in ("train", "val"):
        write_atomic(ann_dir / f"instances_{split}.json", json.dumps(documents[split], separators=(",", ":")).encode())
    return out


def scenes_complete(out_dir: str | os.PathLike, **kwargs) -> bool:
    """True when `out_dir` holds a finished digit-scenes set made with these `make_scenes` arguments."""
    out = Path(out_dir)
    wanted = _params(
        kwargs.get("train_scenes", TRAIN_SCENES),
        kwargs.get("val_scenes", VAL_SCENES),
        kwargs.get("size", SCENE_SIZE),
        kwargs.get("digits", DIGITS_PER_SCENE),
        kwargs.get("scale", DIGIT_SCALE),
        kwargs.get("seed", 0),
    )
    for split in ("train", "val"):
        path = out / "annotations" / f"instances_{split}.json"
        try:
            info = json.loads(path.read_text())["info"]["swinx_scenes"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if info != dict(wanted, split=split):
            return False
    return True


def ensure_scenes(out_dir: str | os.PathLike, **kwargs) -> Path:
    """`out_dir` with a digit-scenes set made with these `make_scenes` arguments, generating it only if needed.

    Run it on one process only (rank 0) when training on several: two writers would race.
    """
    if scenes_complete(out_dir, **kwargs):
        return Path(out_dir)
    return make_scenes(out_dir, **kwargs)
