"""COCO scoring of detector outputs with pycocotools' COCOeval, silenced.

Predictions come in torchvision's output form, one dict per image; they are turned into COCO
results (xywh boxes, the file's category ids, RLE masks) and scored against the ground truth.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The order of COCOeval.stats.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _ground_truth(coco_gt) -> tuple[COCO, dict[int, int]]:
    """The COCO object and the label -> category id map of a CocoDetection, or of a bare COCO (ids in order)."""
    if isinstance(coco_gt, COCO):
        return coco_gt, {label: cat for label, cat in enumerate(sorted(coco_gt.getCatIds()), start=1)}
    return coco_gt.coco, dict(coco_gt.label_to_cat_id)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_coco_results(
    predictions: list[dict],
    label_to_cat_id: dict[int, int],
    iou_types: tuple[str, ...] = ("bbox", "segm"),
    mask_threshold: float = 0.5,
) -> dict[str, list]:
    """COCO result lists per IoU type from torchvision-style predictions.

    Each prediction: `image_id` int, `boxes` (N, 4) XYXY in the image's pixels, `scores` (N,),
    `labels` (N,) in 1..K, and for "segm" `masks` (N, 1, H, W) or (N, H, W): float probabilities,
    binarised at `mask_threshold`, or already binary integer/bool masks (nonzero = inside).
    Returns {"bbox": [{image_id, category_id, bbox xywh, score}],
    "segm": [{image_id, category_id, segmentation RLE (counts as str, JSON-ready), score}]}.
    """
    lookup = dict(label_to_cat_id)
    results: dict[str, list] = {t: [] for t in iou_types}
    for p in predictions:
        image_id = int(p["image_id"])
        boxes = _numpy(p["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _numpy(p["scores"]).astype(np.float64).reshape(-1)
        labels = _numpy(p["labels"]).astype(np.int64).reshape(-1)
        unknown = set(labels.tolist()) - set(lookup)
        if unknown:
            raise ValueError(f"prediction for image {image_id} has labels {sorted(unknown)} outside 1..{len(lookup)}")
        cats = [lookup[int(label)] for label in labels]
        if "bbox" in results:
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
            results["bbox"] += [
                {"image_id": image_id, "category_id": c, "bbox": b, "score": float(s)}
                for c, b, s in zip(cats, xywh.tolist(), scores)
            ]
        if "segm" in results and len(labels):
            if "masks" not in p:
                raise ValueError(f"'segm' scoring needs 'masks' in the predictions; image {image_id} has none")
            masks = p["masks"]
            masks = _numpy(masks)
            if masks.ndim == 4:
                masks = masks[:, 0]
            binary = masks > mask_threshold if np.issubdtype(masks.dtype, np.floating) else masks != 0
            # pycocotools encodes (H, W, N) uint8 in Fortran order; a bool array reinterpreted costs no copy.
            rles = mask_utils.encode(np.asfortranarray(binary.view(np.uint8).transpose(1, 2, 0)))
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")
            results["segm"] += [
                {"image_id": image_id, "category_id": c, "segmentation": r, "score": float(s)}
                for c, r, s in zip(cats, rles, scores)
            ]
    return results


def _load_results(gt: COCO, results: list[dict]) -> COCO:
    if results:
        return gt.loadRes(results)
    # loadRes cannot take an empty list; no detections is a valid (zero-scoring) answer.
    empty = COCO()
    empty.dataset = {
        "images": list(gt.dataset["images"]),
        "annotations": [],
        "categories": list(gt.dataset["categories"]),
    }
    empty.createIndex()
    return empty


def coco_evaluate(
    coco_gt,
    predictions: list[dict],
    iou_types: tuple[str, ...] = ("bbox", "segm"),
    *,
    image_ids: list[int] | None = None,
) -> dict[str, dict]:
    """Score predictions with COCOeval; prints nothing.

    `coco_gt` is a `CocoDetection` (its label -> category id map is used) or a pycocotools COCO
    (labels 1..K then stand for its category ids in increasing order). `predictions` are
    torchvision outputs with `image_id` added (see `to_coco_results`). Images are those of
    `image_ids`, or every ground-truth image; one without a prediction counts as all missed.

    Returns per IoU type {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
    "ARm", "ARl"} as floats in [0, 1] (-1 where pycocotools finds it undefined, e.g. no object of
    that size) and "per_class": {class name: AP at IoU .50:.95, all areas, 100 detections, or
    None for a class with no ground-truth object}.
    """
    gt, label_to_cat_id = _ground_truth(coco_gt)
    known = set(gt.getImgIds())
    stray = sorted({int(p["image_id"]) for p in predictions} - known)
    if stray:
        raise ValueError(f"predictions name image ids {stray[:5]} that are not in the ground truth")
    results = to_coco_results(predictions, label_to_cat_id, iou_types)
    cat_ids = sorted(gt.getCatIds())
    names = {c: str(gt.cats[c].get("name", c)) for c in cat_ids}
    if len(set(names.values())) != len(names):
        names = {c: f"{n} ({c})" for c, n in names.items()}
    scores = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for iou_type in iou_types:
            evaluator = COCOeval(gt, _load_results(gt, results[iou_type]), iou_type)
            evaluator.params.imgIds = sorted(known if image_ids is None else {int(i) for i in image_ids})
            evaluator.params.catIds = cat_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            out = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
            # precision: [IoU thresholds, recall points, classes, area ranges, max detections]; -1 = undefined.
            precision = evaluator.eval["precision"][:, :, :, 0, -1]
            per_class = {}
            for k, cat in enumerate(cat_ids):
                p = precision[:, :, k]
                p = p[p > -1]
                per_class[names[cat]] = float(p.mean()) if p.size else None
            out["per_class"] = per_class
            scores[iou_type] = out
    return scores
