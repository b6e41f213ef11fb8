"""COCO instances data for the torchvision detectors, read robustly from any user's dataset.

`find_splits` locates the annotation files and image folders, `CocoDetection` checks and
cleans the annotations once at construction (clear `DataError`s for files that cannot be
used; counted, reported fixes for the usual blemishes) and yields torchvision-style samples,
and `collate` / `MultiScaleCollate` batch them. Undecodable images become `Unreadable`
markers, which the collate functions hand back beside the batch for the engine to count.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from swinx.engine.data import READ_ERRORS, DataError, Unreadable, open_image

log = logging.getLogger("swinx")

# Short sides for multi-scale training; each batch gets one of them.
TRAIN_SIZES = (224, 256, 288, 320)


# ---------------------------------------------------------------------------------------------
# Finding the splits


def _one(paths: list[Path], what: str) -> Path | None:
    if len(paths) > 1:
        raise DataError(
            f"found several {what}: {', '.join(str(p) for p in paths)}; keep one, or give the files explicitly"
        )
    return paths[0] if paths else None


def _layout_split(root: Path, split: str) -> tuple[Path, Path] | None:
    """(images_dir, ann_json) for one split of `root`, or None when the split has no annotation file."""
    names = ("val", "valid", "validation") if split == "val" else ("train",)
    ann = _one(
        sorted(p for p in (root / "annotations").glob(f"instances_{split}*.json")),
        f"{split} annotation files in {root / 'annotations'}",
    )
    if ann is not None:
        stem = ann.name[len("instances_") : -len(".json")]  # e.g. "train2017"
        candidates = [root / stem, root / "images" / stem] + [root / n for n in names]
        candidates += [root / "images" / n for n in names]
        for images in candidates:
            if images.is_dir():
                return images, ann
        globbed = [p for p in sorted(root.glob(f"{split}*")) if p.is_dir()]
        if len(globbed) == 1:
            return globbed[0], ann
        raise DataError(
            f"found {ann} but no image folder for it; looked for "
            f"{', '.join(str(c) + '/' for c in candidates[:3])} and {root}/{split}*/"
        )
    # Roboflow's export: the annotation file sits inside the image folder.
    for n in names:
        if (root / n / "_annotations.coco.json").is_file():
            return root / n, root / n / "_annotations.coco.json"
    return None


def find_splits(
    root: str | os.PathLike | None = None,
    *,
    train_images: str | os.PathLike | None = None,
    train_ann: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    val_ann: str | os.PathLike | None = None,
    require_val: bool = False,
) -> dict:
    """Locate a COCO dataset's splits: `{"train": (images_dir, ann_json), "val": (images_dir, ann_json) or None}`.

    With `root`, the usual layouts are recognised: `root/annotations/instances_train*.json` beside
    `root/train*/` (e.g. instances_train2017.json + train2017/, or + images/train2017/), and
    Roboflow's `root/{train,valid}/_annotations.coco.json`. Explicit paths override what the
    layout gives, and without `root` they are all there is. A missing val split gives None
    unless `require_val`.
    """
    found: dict[str, tuple[Path, Path] | None] = {"train": None, "val": None}
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(
                f"data directory {root} does not exist"
                if not root.exists()
                else f"{root} is a file; give the dataset's directory (with annotations/ inside)"
            )
        found = {split: _layout_split(root, split) for split in ("train", "val")}
    for split, images, ann in (("train", train_images, train_ann), ("val", val_images, val_ann)):
        if images is None and ann is None:
            continue
        if found[split] is None and (images is None or ann is None):
            raise DataError(f"give both the {split} image folder and the {split} annotation file")
        old_images, old_ann = found[split] or (None, None)
        found[split] = (Path(images) if images is not None else old_images, Path(ann) if ann is not None else old_ann)
    if found["train"] is None:
        where = (
            (
                f"{root}/annotations/instances_train*.json with {root}/train*/ images "
                f"(or {root}/train/_annotations.coco.json)"
            )
            if root is not None
            else "train_images and train_ann"
        )
        raise DataError(f"no COCO train split found; looked for {where}")
    if found["val"] is None and require_val:
        raise DataError(
            f"no COCO val split found; looked for {root}/annotations/instances_val*.json with "
            f"{root}/val*/ images (or give val_images and val_ann)"
        )
    for split, pair in found.items():
        if pair is None:
            continue
        images, ann = pair
        if not images.is_dir():
            raise DataError(f"{split} image folder {images} does not exist")
        if not ann.is_file():
            raise DataError(f"{split} annotation file {ann} does not exist")
    return found


# ---------------------------------------------------------------------------------------------
# Reading and checking one annotation file


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_instances(path: str | os.PathLike) -> dict:
    """The JSON dict of a COCO instances file, with its top-level structure checked (DataError otherwise)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            document = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{path} is not valid JSON{where}: {getattr(e, 'msg', e)}") from None
    if not isinstance(document, dict):
        raise DataError(
            f"{path} is not a COCO instances file: its top level is a JSON "
            f"{type(document).__name__}, not an object with 'images', 'annotations' and 'categories'"
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in document]
    if missing:
        raise DataError(f"{path} is not a COCO instances file: missing {', '.join(repr(k) for k in missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document[key], list):
            raise DataError(
                f"{path} is not a COCO instances file: '{key}' is a {type(document[key]).__name__}, not a list"
            )
    return document


def _polygons(segmentation) -> list | None:
    """The usable polygons of a list segmentation (>= 3 points each), or None."""
    polys = [
        p
        for p in segmentation
        if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p)
    ]
    return polys or None


def _clean_segmentation(segmentation, h: int, w: int):
    """A segmentation pycocotools can decode at (h, w), or None when there is none or it is malformed."""
    if isinstance(segmentation, list):
        return _polygons(segmentation)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [h, w]:
            return None
        if isinstance(segmentation["counts"], (str, bytes, list)):
            return segmentation
    return None


class CocoDetection(Dataset):
    """A COCO instances dataset as torchvision's detectors want it.

    Sample i is `(image, target)`: image a `tv_tensors.Image` uint8 (3, H, W); target a dict with
    `boxes` `tv_tensors.BoundingBoxes` (N, 4) XYXY float32 in pixels, `labels` int64 (N,) in 1..K
    (0 is the detectors' background), `masks` `tv_tensors.Mask` (N, H, W) uint8 when `masks`,
    `image_id` int and `orig_size` (H, W); then `transforms(image, target)` is applied. A file
    that cannot be decoded gives `Unreadable(path, reason)` instead.

    Category ids, whatever they are (1, 3, 7, 90 ...), map to labels 1..K in increasing id order,
    or in the order of `categories` when given (pass the train set's `categories` to its val set
    so both share one mapping). `label_to_cat_id[label]` maps back and `class_names[label - 1]`
    names a label. `coco` is a pycocotools COCO over the cleaned annotations (crowd regions kept),
    which `swinx.detection.evaluate.coco_evaluate` scores against.

    Fixed and counted in `stats` (and logged): annotations of unknown categories dropped
    (`unknown_category`), boxes clipped to the image (`clipped_boxes`), boxes empty or invalid
    after clipping dropped (`dropped_boxes`), crowd annotations left out of training targets
    (`crowd`), images with no object kept as negatives (`negative_images`), masks filled from the
    box for annotations without a usable segmentation (`box_masks`). Fatal (DataError): a file that
    is not COCO instances JSON, annotations naming absent images, image files missing on disk.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms=None,
        *,
        masks: bool = True,
        categories: list[dict] | None = None,
    ):
        self.images_dir, self.ann_file = Path(images_dir), Path(ann_file)
        self.transforms, self.with_masks = transforms, masks
        document = load_instances(self.ann_file)
        name = str(self.ann_file)

        file_categories = document["categories"]
        for c in file_categories:
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise DataError(f"{name}: category {c!r} has no integer 'id'")
        if len({c["id"] for c in file_categories}) != len(file_categories):
            raise DataError(f"{name}: category ids repeat")
        if categories is None:
            categories = sorted(file_categories, key=lambda c: c["id"])
            if not categories:
                raise DataError(f"{name} has no categories; a detector needs at least one class")
        self.categories = [{"id": c["id"], "name": str(c.get("name", c["id"]))} for c in categories]
        self.label_to_cat_id = {label: c["id"] for label, c in enumerate(self.categories, start=1)}
        self.cat_id_to_label = {cat: label for label, cat in self.label_to_cat_id.items()}
        self.class_names = [c["name"] for c in self.categories]

        images = []
        for i, im in enumerate(document["images"]):
            if not isinstance(im, dict) or not _is_int(im.get("id")):
                raise DataError(f"{name}: images[{i}] has no integer 'id'")
            if not isinstance(im.get("file_name"), str) or not im["file_name"]:
                raise DataError(f"{name}: image {im['id']} has no 'file_name'")
            images.append(dict(im))
        by_id = {im["id"]: im for im in images}
        if len(by_id) != len(images):
            raise DataError(f"{name}: image ids repeat")

        missing = [im["file_name"] for im in images if not (self.images_dir / im["file_name"]).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(images)} images listed in {name} are missing from "
                f"{self.images_dir}, the first: {self.images_dir / missing[0]}"
            )
        for im in images:
            if not (_is_int(im.get("width")) and _is_int(im.get("height")) and im["width"] > 0 and im["height"] > 0):
                # Only the header is read; a file too broken for that is reported when its sample is read.
                try:
                    with Image.open(self.images_dir / im["file_name"]) as f:
                        im["width"], im["height"] = f.size
                except READ_ERRORS:
                    im["width"] = im["height"] = None

        stats = dict(
            images=len(images),
            objects=0,
            unknown_category=0,
            clipped_boxes=0,
            dropped_boxes=0,
            crowd=0,
            negative_images=0,
            box_masks=0,
            with_segmentation=0,
        )
        annotations = []
        ids_ok = True
        for i, a in enumerate(document["annotations"]):
            if not isinstance(a, dict):
                raise DataError(f"{name}: annotations[{i}] is a {type(a).__name__}, not an object")
            for key in ("image_id", "category_id"):
                if key not in a:
                    raise DataError(f"{name}: annotation {a.get('id', f'#{i}')} has no '{key}'")
            if a["image_id"] not in by_id:
                bad = [b for b in document["annotations"] if isinstance(b, dict) and b.get("image_id") not in by_id]
                raise DataError(
                    f"{name}: annotation {a.get('id', f'#{i}')} names image_id {a['image_id']!r}, "
                    f"which is not in 'images' ({len(bad)} annotation(s) name absent images)"
                )
            if a["category_id"] not in self.cat_id_to_label:
                stats["unknown_category"] += 1
                continue
            im = by_id[a["image_id"]]
            h, w = im["height"], im["width"]
            if h is None:
                continue  # unreadable header: the sample itself will be reported as Unreadable
            a = dict(a)
            segmentation = _clean_segmentation(a.get("segmentation"), h, w)
            box = a.get("bbox")
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
                if segmentation is None:
                    stats["dropped_boxes"] += 1
                    continue
                box = mask_utils.toBbox(self._rle(segmentation, h, w)).tolist()
            x0, y0, bw, bh = (float(v) for v in box)
            x1, y1 = x0 + bw, y0 + bh
            cx0, cy0, cx1, cy1 = min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)
            if bw <= 0 or bh <= 0 or cx1 <= cx0 or cy1 <= cy0:
                stats["dropped_boxes"] += 1
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                stats["clipped_boxes"] += 1
            a["bbox"] = [cx0, cy0, cx1 - cx0, cy1 - cy0]
            a["iscrowd"] = 1 if a.get("iscrowd") else 0
            a["_box_mask"] = segmentation is None
            if segmentation is None:
                # COCOeval's segm scoring needs a region for every object: the box is the honest fallback.
                segmentation = [[cx0, cy0, cx1, cy0, cx1, cy1, cx0, cy1]]
            else:
                stats["with_segmentation"] += 1
            a["segmentation"] = segmentation
            if not _is_number(a.get("area")) or a["area"] < 0:
                a["area"] = float(mask_utils.area(self._rle(segmentation, h, w)))
            ids_ok = ids_ok and _is_int(a.get("id"))
            annotations.append(a)
        if not ids_ok or len({a["id"] for a in annotations}) != len(annotations):
            # pycocotools indexes annotations by id; missing or repeated ids would silently merge objects.
            log.warning("%s: annotation ids missing or repeated; renumbering them 1..%d", name, len(annotations))
            for k, a in enumerate(annotations, start=1):
                a["id"] = k

        per_image: dict[int, list[dict]] = {im["id"]: [] for im in images}
        for a in annotations:
            if a["iscrowd"]:
                stats["crowd"] += 1
            else:
                per_image[a["image_id"]].append(a)
                stats["box_masks"] += a["_box_mask"]
        stats["objects"] = sum(len(v) for v in per_image.values())
        stats["negative_images"] = sum(1 for v in per_image.values() if not v)
        self.stats = stats
        self.images = images
        self._targets = [per_image[im["id"]] for im in images]

        self.coco = COCO()
        gt = [{k: v for k, v in a.items() if not k.startswith("_")} for a in annotations]
        self.coco.dataset = {"images": images, "annotations": gt, "categories": self.categories}
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        for line in self.problems():
            log.warning("%s: %s", name, line)

    @staticmethod
    def _rle(segmentation, h: int, w: int):
        if isinstance(segmentation, list):
            return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, h, w)
        return segmentation

    def problems(self) -> list[str]:
        """One line per kind of fix applied to the annotations (empty when there were none)."""
        s, lines = self.stats, []
        if s["unknown_category"]:
            lines.append(f"dropped {s['unknown_category']} annotation(s) whose category_id is not in 'categories'")
        if s["clipped_boxes"]:
            lines.append(f"clipped {s['clipped_boxes']} box(es) that reach outside their image")
        if s["dropped_boxes"]:
            lines.append(f"dropped {s['dropped_boxes']} box(es) of zero or negative size (after clipping) or malformed")
        if s["crowd"]:
            lines.append(f"left {s['crowd']} crowd annotation(s) out of training (they only mark ignore regions)")
        if self.with_masks and s["box_masks"] and s["with_segmentation"]:
            lines.append(f"{s['box_masks']} object(s) have no usable segmentation; their box is used as mask")
        return lines

    def summary(self) -> str:
        """E.g. "1500 images (12 without objects), 8277 objects, 10 classes"."""
        s = self.stats
        return (
            f"{s['images']} images ({s['negative_images']} without objects), {s['objects']} objects, "
            f"{len(self.class_names)} classes"
        )

    @property
    def has_masks(self) -> bool:
        """Whether any object has a real segmentation (else masks would all be filled boxes)."""
        return self.stats["with_segmentation"] > 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        info = self.images[index]
        path = self.images_dir / info["file_name"]
        try:
            pil = open_image(path, 3)
        except READ_ERRORS as e:
            return Unreadable(str(path), f"{type(e).__name__}: {e}")
        h, w = info["height"], info["width"]
        if (pil.height, pil.width) != (h, w):
            return Unreadable(str(path), f"the image is {pil.width}x{pil.height} but {self.ann_file.name} says {w}x{h}")
        image = tv_tensors.Image(v2.functional.pil_to_tensor(pil))
        anns = self._targets[index]
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=torch.float32,
        ).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(info["id"]),
            "orig_size": (h, w),
        }
        if self.with_masks:
            masks = np.zeros((len(anns), h, w), dtype=np.uint8)
            for k, a in enumerate(anns):
                if a["_box_mask"]:
                    x0, y0, bw, bh = a["bbox"]
                    masks[k, int(y0) : math.ceil(y0 + bh), int(x0) : math.ceil(x0 + bw)] = 1
                else:
                    masks[k] = mask_utils.decode(self._rle(a["segmentation"], h, w))
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# ---------------------------------------------------------------------------------------------
# Transforms and batching


def train_transforms(hflip: float = 0.5) -> v2.Compose:
    """Random horizontal flip, uint8 -> float [0, 1], then drop boxes the flip left under 1 px. Native size kept."""
    steps = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()])


def eval_transforms() -> v2.Compose:
    """uint8 -> float [0, 1], native size (the detector resizes, and maps predictions back to this size)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


def collate(samples: list) -> tuple[tuple[list, list] | None, list[Unreadable]]:
    """Detection batches: `((images, targets), bad)`.

    images is a list of (3, H_i, W_i) tensors (sizes may differ), targets the matching list of
    dicts, bad the `Unreadable` samples left out. The batch is None when every sample was bad,
    the same protocol as `swinx.engine.data.SkippingCollate`.
    """
    good = [s for s in samples if not isinstance(s, Unreadable)]
    bad = [s for s in samples if isinstance(s, Unreadable)]
    if not good:
        return None, bad
    return ([image for image, _ in good], [target for _, target in good]), bad


class MultiScaleCollate:
    """`collate` after resizing every sample of a batch to one short side drawn per batch from `sizes`.

    The draw comes from `generator`, or from torch's global RNG when it is None. That keeps runs
    reproducible: with num_workers=0 the collate runs in the main process, whose torch RNG the
    engine reseeds every epoch; with workers, each worker's torch seed is itself drawn from the
    main process's RNG. Boxes and masks are resized with the image (v2 handles tv_tensors; masks
    by nearest neighbour), and boxes that shrink under 1 px are dropped with their labels and masks.
    `max_size` caps the long side. The chosen size of the last batch is in `last_size`.
    """

    def __init__(
        self,
        sizes: tuple[int, ...] = TRAIN_SIZES,
        max_size: int | None = None,
        generator: torch.Generator | None = None,
    ):
        if not sizes:
            raise ValueError("MultiScaleCollate needs at least one size")
        self.sizes, self.max_size, self.generator = tuple(int(s) for s in sizes), max_size, generator
        self.last_size: int | None = None

    def __call__(self, samples: list):
        good = [s for s in samples if not isinstance(s, Unreadable)]
        size = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=self.generator))]
        self.last_size = size
        resize = v2.Compose([v2.Resize(size, max_size=self.max_size, antialias=True), v2.SanitizeBoundingBoxes()])
        resized = iter([resize(image, target) for image, target in good])
        return collate([s if isinstance(s, Unreadable) else next(resized) for s in samples])
