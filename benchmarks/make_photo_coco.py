"""A small COCO detection / instance-segmentation set made offline from photographs in installed packages.

    python benchmarks/make_photo_coco.py OUT [--train 300 --val 60 --seed 0]

What the data is: photographic object crops composited onto photographic backgrounds. It is a
stand-in for "a new user's small COCO dataset of their own" (a few hundred photos of about 300 px,
a handful of classes) for when nothing can be downloaded; it is NOT a real photo collection. The
objects are pasted, so their lighting, scale and context do not match the background, and each class
comes from a single source photograph (one cat, one cup, one flower, one rocket, 20 coins of one
photo), so a model trained on it learns those few objects, not the categories.

Sources (all shipped inside installed packages, nothing is fetched):
  objects (each class from a distinct photograph; category ids deliberately NOT contiguous):
    1  coin    skimage.data.coins()  20 individual coins, segmented by a top-hat threshold, each
                                     coin's convex hull as its mask (hard-ish alpha); grey
    3  cat     skimage.data.chelsea() the cat's face, an elliptical feathered mask
    5  cup     skimage.data.coffee() espresso cup and saucer, union of two ellipses, feathered
    8  flower  sklearn's datasets/images/flower.jpg  the dahlia, segmented by colour (orange vs
                                     dark green), feathered
    12 rocket  skimage.data.rocket() the launch vehicle, segmented by brightness vs the night sky
  backgrounds (random crops, random scale, flips, colour jitter; none of them show an object class):
    sklearn china.jpg, skimage stereo_motorcycle (left), matplotlib grace_hopper.jpg, skimage
    hubble_deep_field, immunohistochemistry, retina, camera, brick, grass, gravel, moon, cell,
    clock, page, text (greyscale ones are replicated to RGB), and the two sides of rocket.jpg
    away from the rocket (launch towers and white lightning masts: a rocket-like distractor).

Each image: about 300 px short side (sizes like 300x400, 400x300, 320x320, 288x432), 1-4 objects of
40-160 px longest side (rocket 60-160), optional slight rotation, limited overlap (later objects may
occlude earlier ones a little; the annotation is the visible part). Annotations: bbox = tight xywh
box of the visible mask (alpha > 0.5), area = its pixel count, segmentation = compressed RLE
from pycocotools.mask.encode with counts as str, iscrowd 0. Deterministic from --seed.

Writes OUT/train/*.jpg, OUT/val/*.jpg (JPEG quality 90), OUT/annotations/instances_train.json,
OUT/annotations/instances_val.json. With --semantic, the same images as semantic segmentation:
OUT/images/{train,val}/*.jpg, OUT/annotations/{train,val}/*.png (0 background, 1-5 the classes in
the order coin, cat, cup, flower, rocket) and OUT/classes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "coin", "supercategory": "object"},
    {"id": 3, "name": "cat", "supercategory": "animal"},
    {"id": 5, "name": "cup", "supercategory": "object"},
    {"id": 8, "name": "flower", "supercategory": "plant"},
    {"id": 12, "name": "rocket", "supercategory": "vehicle"},
]
SIZES = [(300, 400), (400, 300), (320, 320), (288, 432), (432, 288), (300, 300), (320, 427), (427, 320), (304, 380)]


def _sklearn_image(name: str) -> np.ndarray:
    import sklearn.datasets

    return np.asarray(Image.open(Path(sklearn.datasets.__file__).parent / "images" / name).convert("RGB"))


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


def _largest(m: np.ndarray) -> np.ndarray:
    from skimage import measure

    lab = measure.label(m)
    if lab.max() == 0:
        return m
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _feather(m: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    a = ndi.gaussian_filter(m.astype(np.float32), sigma)
    return np.clip(a, 0, 1)


def _rgba(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Crop to the alpha's support; uint8 RGBA."""
    ys, xs = np.nonzero(alpha > 0.02)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    a = (alpha[y0:y1, x0:x1] * 255).round().astype(np.uint8)
    return np.dstack([rgb[y0:y1, x0:x1], a])


def object_sources() -> dict[int, list[np.ndarray]]:
    """category id -> list of RGBA uint8 crops (the object and its alpha)."""
    import skimage.data as sd
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology

    out: dict[int, list[np.ndarray]] = {}

    # coins: top-hat (remove the uneven lighting), Otsu, convex hull per coin, keep near-circular ones
    c = sd.coins().astype(np.float32)
    bg = ndi.maximum_filter(ndi.minimum_filter(c, size=71), size=71)
    th = c - bg
    m = morphology.opening(th > filters.threshold_otsu(th), morphology.disk(2))
    coins = []
    crgb = _rgb(sd.coins())
    for r in measure.regionprops(measure.label(m)):
        y0, x0, y1, x1 = r.bbox
        h, w = y1 - y0, x1 - x0
        if r.area < 500 or min(h, w) / max(h, w) < 0.85 or r.area_convex / (np.pi * (max(h, w) / 2) ** 2) < 0.85:
            continue
        full = np.zeros(c.shape, bool)
        full[y0:y1, x0:x1] = r.image_convex
        coins.append(_rgba(crgb, _feather(full, 0.7)))
    out[1] = coins

    # cat: chelsea's face, an ellipse (clipped by the frame at the bottom)
    cat = sd.chelsea()
    out[3] = [_rgba(cat, _feather(_ellipse(*cat.shape[:2], 160, 222, 150, 190), 4))]

    # cup: coffee's cup and saucer, saucer ellipse + cup-rim ellipse
    cof = sd.coffee()
    h, w = cof.shape[:2]
    cm = _ellipse(h, w, 232, 277, 158, 203) | _ellipse(h, w, 108, 292, 94, 120)
    out[5] = [_rgba(cof, _feather(cm, 2.5))]

    # flower: sklearn's dahlia, orange against dark green
    fl = _sklearn_image("flower.jpg")
    sub = fl[70:375, 160:465].astype(int)
    fm = (sub[..., 0] > 110) & (sub[..., 0] > sub[..., 2] + 30)
    fm = ndi.binary_fill_holes(morphology.closing(fm, morphology.disk(3)))
    fm = morphology.opening(_largest(fm), morphology.disk(2))
    out[8] = [_rgba(fl[70:375, 160:465], _feather(fm, 1.5))]

    # rocket: bright vehicle against the dark blue sky
    rk = sd.rocket()
    sub = rk[115:340, 295:350]
    r, b = sub[..., 0].astype(int), sub[..., 2].astype(int)
    rows = np.arange(sub.shape[0])[:, None]
    # near the horizon the sky brightens: there also ask for "not blue"
    rm = (r > 70) & ((rows < 165) | ((r > 85) & (r > b - 10)))
    rm = _largest(ndi.binary_fill_holes(morphology.closing(rm, morphology.disk(2))))
    out[12] = [_rgba(sub, _feather(rm, 0.7))]
    return out


def background_sources() -> list[tuple[np.ndarray, bool, float]]:
    """(RGB uint8 region, vertical flip allowed, sampling weight). None show an object class."""
    import matplotlib.cbook
    import skimage.data as sd

    def gh():
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))

    rk = sd.rocket()
    ret = sd.retina()
    colour = [
        (_sklearn_image("china.jpg"), False, 3.0),
        (sd.stereo_motorcycle()[0], False, 3.0),
        (gh(), False, 2.0),
        (sd.hubble_deep_field(), True, 2.0),
        (sd.immunohistochemistry(), True, 2.0),
        (ret[250:1160, 250:1160], True, 1.5),
        (rk[:, :290], False, 1.5),
        (rk[:, 350:], False, 1.5),
    ]
    grey = [
        (sd.camera(), False, 1.0),
        (sd.brick(), True, 1.0),
        (sd.grass(), True, 1.0),
        (sd.gravel(), True, 1.0),
        (sd.moon(), True, 0.7),
        (sd.cell(), True, 0.7),
        (sd.clock(), False, 0.7),
        (sd.page(), False, 0.4),
        (sd.text(), False, 0.4),
    ]
    return [(_rgb(a), v, wt) for a, v, wt in colour + grey]


def _jitter(rgb: np.ndarray, rng, strength: float) -> np.ndarray:
    """Brightness, contrast, saturation jitter; float in, float out (0..255)."""
    x = rgb.astype(np.float32)
    b, c, s = (1 + rng.uniform(-strength, strength, 3)).tolist()
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * s
    x = (x - x.mean()) * c + x.mean()
    return np.clip(x * b, 0, 255)


def make_background(bgs, weights, rng) -> np.ndarray:
    h, w = SIZES[rng.integers(len(SIZES))]
    src, vflip, _ = bgs[rng.choice(len(bgs), p=weights)]
    sh, sw = src.shape[:2]
    # crop of the output's aspect at a random scale (source px per output px), within the source
    smax = min(sh / h, sw / w)
    s = float(np.exp(rng.uniform(np.log(min(0.6, smax)), np.log(min(2.2, smax)))))
    ch, cw = min(sh, round(h * s)), min(sw, round(w * s))
    y0, x0 = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
    img = Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.BILINEAR)
    a = np.asarray(img)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    if vflip and rng.random() < 0.5:
        a = a[::-1]
    return _jitter(a, rng, 0.25)


def make_object(rgba: np.ndarray, cid: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Scaled, flipped, maybe rotated, jittered object: (RGB float, alpha float 0..1)."""
    lo = 60 if cid == 12 else 40
    L = float(np.exp(rng.uniform(np.log(lo), np.log(160))))
    h, w = rgba.shape[:2]
    f = L / max(h, w)
    im = Image.fromarray(rgba).resize((max(2, round(w * f)), max(2, round(h * f))), Image.LANCZOS)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        im = im.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, expand=True)
    a = np.asarray(im).astype(np.float32)
    return _jitter(a[..., :3], rng, 0.15), a[..., 3] / 255.0


def make_image(objs, bgs, weights, rng):
    """(RGB uint8 image, [(category id, visible bool mask)])."""
    canvas = make_background(bgs, weights, rng)
    H, W = canvas.shape[:2]
    cids = sorted(objs)
    placed: list[list] = []  # [cid, visible mask, full mask area]
    for _ in range(int(rng.integers(1, 5))):
        cid = cids[rng.integers(len(cids))]
        src = objs[cid][rng.integers(len(objs[cid]))]
        for _try in range(20):
            rgb, alpha = make_object(src, cid, rng)
            h, w = alpha.shape
            if h >= H or w >= W:
                continue
            y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            full = np.zeros((H, W), bool)
            full[y : y + h, x : x + w] = alpha > 0.5
            new_area = int(full.sum())
            if new_area < 16:
                continue
            # limited overlap: the new object covers at most 25% of any earlier one's visible part,
            # and at most 25% of the new one lies over earlier objects
            ok = all((p[1] & full).sum() <= 0.25 * p[1].sum() for p in placed)
            ok = ok and sum(int((p[1] & full).sum()) for p in placed) <= 0.25 * new_area
            if not ok:
                continue
            a = alpha[..., None]
            region = canvas[y : y + h, x : x + w]
            canvas[y : y + h, x : x + w] = region * (1 - a) + rgb * a
            for p in placed:
                p[1] &= ~full
            placed.append([cid, full])
            break
    img = np.clip(canvas, 0, 255).round().astype(np.uint8)
    return img, [(cid, m) for cid, m in placed if m.sum() >= 16]


def write_split(out: Path, split: str, n: int, seed: int, first_image_id: int, first_ann_id: int, objs, bgs, weights):
    from pycocotools import mask as mask_utils

    (out / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    ann_id = first_ann_id
    for i in range(n):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        img, inst = make_image(objs, bgs, weights, rng)
        image_id = first_image_id + i
        name = f"{split}_{i:05d}.jpg"
        Image.fromarray(img).save(out / split / name, quality=90)
        H, W = img.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
        for cid, m in inst:
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cid,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(m.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [H, W], "counts": rle["counts"]},
                }
            )
            ann_id += 1
    coco = {
        "info": {
            "description": "photographic object crops composited onto photographic backgrounds "
            "(benchmarks/make_photo_coco.py); a stand-in, not a real photo collection",
            "version": "1",
        },
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": CATEGORIES,
    }
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    tmp = out / "annotations" / f".instances_{split}.json.tmp"
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, out / "annotations" / f"instances_{split}.json")
    return len(images), len(anns), ann_id


def write_semantic_split(out: Path, split: str, n: int, seed: int, objs, bgs, weights) -> int:
    """The same images as `write_split`, as semantic segmentation in the ADE20K folder convention:
    images/<split>/*.jpg and annotations/<split>/*.png holding 0 (background) or 1 + the category's
    position in CATEGORIES for each pixel of an object's visible mask."""
    index = {c["id"]: i + 1 for i, c in enumerate(CATEGORIES)}
    for folder in ("images", "annotations"):
        (out / folder / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        img, inst = make_image(objs, bgs, weights, rng)
        labels = np.zeros(img.shape[:2], np.uint8)
        for cid, m in inst:
            labels[m] = index[cid]
        Image.fromarray(img).save(out / "images" / split / f"{split}_{i:05d}.jpg", quality=90)
        Image.fromarray(labels, "L").save(out / "annotations" / split / f"{split}_{i:05d}.png")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--semantic",
        action="store_true",
        help="write semantic segmentation (images/, annotations/ index PNGs, classes.json) instead of COCO",
    )
    args = ap.parse_args(argv)
    t0 = time.time()
    objs = object_sources()
    bgs = background_sources()
    weights = np.array([b[2] for b in bgs], float)
    weights /= weights.sum()
    if args.semantic:
        for split, n in (("train", args.train), ("val", args.val)):
            write_semantic_split(args.out, split, n, args.seed, objs, bgs, weights)
        classes = ["background"] + [c["name"] for c in CATEGORIES]
        (args.out / "classes.json").write_text(json.dumps({"classes": classes}))
        print(f"{args.out}: train {args.train} / val {args.val} images, classes {classes}, {time.time() - t0:.1f} s")
        return 0
    ni, na, next_ann = write_split(args.out, "train", args.train, args.seed, 1, 1, objs, bgs, weights)
    vi, va, _ = write_split(args.out, "val", args.val, args.seed, 1 + args.train, next_ann, objs, bgs, weights)
    print(
        f"{args.out}: train {ni} images / {na} objects, val {vi} images / {va} objects, "
        f"classes {[c['name'] for c in CATEGORIES]} (ids {[c['id'] for c in CATEGORIES]}), "
        f"{len(objs[1])} coin crops, {time.time() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
