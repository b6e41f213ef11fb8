"""Detection at inference: load a trained detector, score it on COCO data at any size, predict
boxes, labels, scores and masks for any image file, and draw them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from swinx.detection import data as D
from swinx.detection.evaluate import coco_evaluate
from swinx.detection.model import set_eval_size
from swinx.engine.data import READ_ERRORS, DataError, ShardSampler, open_image
from swinx.engine.loop import Dist
from swinx.engine.rundir import resolve_checkpoint  # noqa: F401 - part of this module's API

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class DetectError(ValueError):
    """A detector checkpoint or an input that cannot be used; the message says why."""


@dataclass
class LoadedDetector:
    model: torch.nn.Module
    classes: list[str]
    spec: dict
    img_size: str | None  # the evaluation size the run used (None: native)
    train_config: dict
    path: Path


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedDetector:
    """A detector saved by `swinx detect train` (a run directory or its .safetensors), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from swinx.detection.train import build_detector
    from swinx.weights.checkpoint import read_metadata

    path = resolve_checkpoint(path)
    try:
        meta = read_metadata(path)
    except Exception as e:  # noqa: BLE001 - any decoding failure means the same to the user
        raise DetectError(f"cannot read {path}: {e}") from e
    if meta.get("task") != "detection":
        raise DetectError(
            f"{path} is not a swinx detector checkpoint (no detection metadata); "
            "for classifiers use swinx eval / swinx predict"
        )
    spec = json.loads(meta["detector"])
    model = build_detector(spec)
    try:
        model.load_state_dict(load_file(path))
    except (RuntimeError, SafetensorError) as e:
        raise DetectError(f"{path} does not fit the detector it describes: {str(e).splitlines()[0]}") from e
    model.to(device).eval()
    return LoadedDetector(
        model,
        json.loads(meta["classes"]),
        spec,
        json.loads(meta.get("img_size", "null")),
        json.loads(meta.get("train_config", "{}")),
        path,
    )


@torch.no_grad()
def evaluate_detector(
    model: torch.nn.Module,
    dataset: D.CocoDetection,
    device: torch.device | str = "cpu",
    *,
    size: tuple[int, int] | None = None,
    ddp: Dist | None = None,
    dtype=None,
    batch_size: int = 8,
    workers: int = 0,
) -> dict:
    """COCO box (and mask) AP of `model` on `dataset`, every image resized to `size` = (H, W) or at
    its own size (None); predictions are mapped back to the original pixels before scoring.

    Returns coco_evaluate's {"bbox": {...}, "segm": {...}} plus "skipped"/"first_unreadable"
    (undecodable images, counted as all-missed). Each rank predicts its shard; all ranks score.
    """
    ddp, device = ddp or Dist(), torch.device(device)
    was_training = model.training
    model.eval()
    set_eval_size(model, size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), ddp.rank, ddp.world),
        num_workers=workers,
        collate_fn=D.collate,
    )
    predictions, skipped, first_bad = [], 0, None
    for batch, bad in loader:
        skipped += len(bad)
        first_bad = first_bad or (bad[0] if bad else None)
        if batch is None:
            continue
        images, targets = batch
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model([im.to(device) for im in images])
        for out, target in zip(outputs, targets):
            item = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}
            if "masks" in item:  # (N, 1, H, W) probabilities; RLE-encoded later, keep them compact here
                item["masks"] = (item["masks"] > 0.5).to(torch.uint8)
            predictions.append({**item, "image_id": int(target["image_id"])})
    set_eval_size(model, None)
    model.train(was_training)
    predictions = ddp.gather(predictions)
    skipped = sum(ddp.gather([skipped]))
    iou_types = ("bbox", "segm") if dataset.with_masks else ("bbox",)
    result = coco_evaluate(dataset, predictions, iou_types)
    return {**result, "skipped": skipped, "first_unreadable": first_bad}


def metrics_row(result: dict | None, masks: bool) -> dict:
    """The metrics.jsonl fields of one evaluation: val_AP.. for boxes, val_mask_AP.. for masks (None: not run)."""
    row = {"val_loss": None}
    for kind, prefix in (("bbox", "val_"), ("segm", "val_mask_")):
        if kind == "segm" and not masks:
            continue
        for name in METRICS:
            row[prefix + name] = None if result is None else result[kind][name]
    return row


def eval_report(result: dict, size: tuple[int, int] | None) -> dict:
    """One evaluation as `swinx detect eval --json` prints it: pycocotools' names, fractions in [0, 1]."""
    report = {kind: result[kind] for kind in ("bbox", "segm") if kind in result}
    report["img_size"] = None if size is None else f"{size[0]}x{size[1]}"
    report["skipped_images"] = result["skipped"]
    return report


def eval_dataset(loaded: LoadedDetector, data: str | os.PathLike | None) -> D.CocoDetection:
    """The validation split of `data` (a COCO root), or the held-out digit scenes when None."""
    from swinx.detection import scenes
    from swinx.detection.train import scenes_dir

    if data is None:
        root = scenes.ensure_scenes(scenes_dir())
    else:
        root = Path(data)
    splits = D.find_splits(root)
    split = splits.get("val") or splits["train"]
    masks = loaded.spec["name"].startswith("maskrcnn")
    dataset = D.CocoDetection(*split, D.eval_transforms(), masks=masks)
    if dataset.class_names != loaded.classes:
        raise DataError(
            f"{split[1]} has classes {dataset.class_names[:10]}, the detector was trained on {loaded.classes[:10]}"
        )
    return dataset


def evaluate_checkpoint(
    checkpoint, data=None, *, sizes: list | None = None, batch_size: int = 8, device: str = "cpu"
) -> list[dict]:
    """`swinx detect eval`: one report per size (None: the run's own evaluation size)."""
    from swinx.detection.train import parse_size

    loaded = load_detector(checkpoint, device)
    dataset = eval_dataset(loaded, data)
    reports = []
    for size in sizes or [loaded.img_size]:
        hw = parse_size(size) if size not in (None, "native") else None
        result = evaluate_detector(loaded.model, dataset, device, size=hw, batch_size=batch_size)
        reports.append(eval_report(result, hw))
    return reports


@torch.no_grad()
def predict(
    loaded: LoadedDetector,
    images: list[str | os.PathLike],
    *,
    score_threshold: float = 0.5,
    size: tuple[int, int] | None = None,
    draw_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Boxes (XYXY pixels of the original image), labels, scores (and mask areas) per image file.

    An image that cannot be decoded gives {"image", "error"} and the others are still answered.
    With `draw_dir`, a PNG with the boxes (and masks) drawn is written there per image.
    """
    from torchvision.transforms.v2 import functional as F

    model = loaded.model
    device = next(model.parameters()).device
    set_eval_size(model, size)
    results = []
    for path in images:
        try:
            image = F.to_image(open_image(path, 3))
        except READ_ERRORS as e:
            results.append({"image": str(path), "error": f"cannot read image: {e}"})
            continue
        out = model([F.to_dtype(image, torch.float32, scale=True).to(device)])[0]
        keep = out["scores"] >= score_threshold
        out = {k: v[keep].cpu() for k, v in out.items()}
        item = {
            "image": str(path),
            "width": image.shape[-1],
            "height": image.shape[-2],
            "detections": [
                {
                    "class": loaded.classes[int(label) - 1],
                    "label": int(label),
                    "score": round(float(score), 4),
                    "box": [round(float(v), 1) for v in box],
                }
                for box, label, score in zip(out["boxes"], out["labels"], out["scores"])
            ],
        }
        if "masks" in out:
            for det, mask in zip(item["detections"], out["masks"]):
                det["mask_area"] = int((mask[0] > 0.5).sum())
        if draw_dir is not None:
            item["drawing"] = str(draw(image, out, loaded.classes, Path(draw_dir) / (Path(path).stem + ".png")))
        results.append(item)
    set_eval_size(model, None)
    return results


def draw(image: torch.Tensor, out: dict, classes: list[str], path: Path) -> Path:
    """The image with masks (torchvision's draw_segmentation_masks) and boxes (draw_bounding_boxes), atomic PNG."""
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from swinx.weights.checkpoint import atomic_write

    canvas = image
    if "masks" in out and len(out["masks"]):
        canvas = draw_segmentation_masks(canvas, out["masks"][:, 0] > 0.5, alpha=0.45)
    labels = [f"{classes[int(label) - 1]} {float(s):.2f}" for label, s in zip(out["labels"], out["scores"])]
    if len(out["boxes"]):
        canvas = draw_bounding_boxes(
            canvas, out["boxes"], labels, colors="yellow", width=max(1, image.shape[-1] // 200)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: write_png(canvas, str(tmp)))
    return path
