"""Segmentation at inference, at any input size: whole image or sliding window, optional multi-scale
and flip test-time augmentation, mIoU evaluation, index PNGs and colour overlays.

Every prediction comes back at the input's own size: the image is resized to the asked size (if
any), predicted, and the logits are resized back (bilinear) before the argmax, as
mmsegmentation scores ADE20K.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from swinx.engine.data import READ_ERRORS, DataError, ShardSampler, open_image
from swinx.engine.loop import Dist
from swinx.engine.rundir import resolve_checkpoint
from swinx.model.ops import bilinear_resize
from swinx.segmentation import data as D
from swinx.segmentation.evaluate import confusion_matrix, metrics
from swinx.weights.checkpoint import CheckpointError, atomic_write, read_task_model

MODES = ("whole", "slide")


@dataclass
class InferenceSettings:
    """How to predict: `size` (H, W) to resize to first (None: the image's own size); `mode` whole or
    slide with `crop` (H, W) windows every `stride` (H, W) pixels, logits averaged where they overlap;
    `scales` (ratios of the size, e.g. 0.75 1.0 1.25) and `flip` for test-time augmentation,
    which averages the softmax probabilities."""

    size: tuple[int, int] | None = None
    mode: str = "whole"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    batch_size: int = 8  # windows (slide) or same-size images (whole) per forward pass

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be whole or slide, got {self.mode!r}")
        if min(self.crop) < 1 or min(self.stride) < 1:
            raise ValueError(f"crop and stride must be positive, got {self.crop} and {self.stride}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive ratios, got {self.scales}")

    def describe(self) -> str:
        size = "native size" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        text = f"{self.mode} at {size}"
        if self.mode == "slide":
            text += f", crop {self.crop[0]}x{self.crop[1]} stride {self.stride[0]}x{self.stride[1]}"
        if self.scales != [1.0] or self.flip:
            text += f", scales {self.scales}{' + flip' if self.flip else ''}"
        return text


def _forward(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)["out"]


def slide_logits(model, image: torch.Tensor, crop, stride, batch_size: int = 8) -> torch.Tensor:
    """(K, H, W) logits of one (3, H, W) image from windows of `crop` every `stride` (the last window
    of a row or column is moved back to end at the border; a window larger than the image is the
    image), averaged where windows overlap."""
    _, h, w = image.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    rows = max(h - ch + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - cw + stride[1] - 1, 0) // stride[1] + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride[0], h - ch), min(c * stride[1], w - cw)
            boxes.append((y1, x1))
    total, count = None, torch.zeros(1, h, w, device=image.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        logits = _forward(model, torch.stack([image[:, y : y + ch, x : x + cw] for y, x in chunk])).float()
        if total is None:
            total = torch.zeros(logits.shape[1], h, w, device=image.device)
        for (y, x), part in zip(chunk, logits):
            total[:, y : y + ch, x : x + cw] += part
            count[:, y : y + ch, x : x + cw] += 1
    return total / count


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return bilinear_resize(x[None] if x.dim() == 3 else x, size).squeeze(0)


def predict_logits(model, images: list[torch.Tensor], settings: InferenceSettings) -> list[torch.Tensor]:
    """Scores (K, H_i, W_i) at each image's own size: logits, or with test-time augmentation the mean
    softmax probability. Images are float (3, H_i, W_i) in [0, 1] on the model's device."""
    tta = settings.scales != [1.0] or settings.flip
    results: list[torch.Tensor | None] = [None] * len(images)
    for scale in settings.scales:
        for flip in (False, True) if settings.flip else (False,):
            views = []
            for image in images:
                h, w = settings.size or image.shape[-2:]
                size = (max(1, round(h * scale)), max(1, round(w * scale)))
                view = _resize(image, size)
                views.append(view.flip(-1) if flip else view)
            for i, scores in enumerate(_views_logits(model, views, settings)):
                scores = scores.flip(-1) if flip else scores
                scores = _resize(scores, images[i].shape[-2:])
                if tta:
                    scores = scores.softmax(0)
                results[i] = scores if results[i] is None else results[i] + scores
    n = len(settings.scales) * (2 if settings.flip else 1)
    return [r / n if tta else r for r in results]


def _views_logits(model, views: list[torch.Tensor], settings: InferenceSettings) -> list[torch.Tensor]:
    if settings.mode == "slide":
        return [slide_logits(model, v, settings.crop, settings.stride, settings.batch_size) for v in views]
    out: list[torch.Tensor | None] = [None] * len(views)
    by_size: dict[tuple, list[int]] = {}
    for i, v in enumerate(views):
        by_size.setdefault(tuple(v.shape), []).append(i)
    for indices in by_size.values():  # same-size images go through together
        for start in range(0, len(indices), settings.batch_size):
            chunk = indices[start : start + settings.batch_size]
            for i, logits in zip(chunk, _forward(model, torch.stack([views[i] for i in chunk])).float()):
                out[i] = logits
    return out


@torch.no_grad()
def evaluate_segmenter(
    model: torch.nn.Module,
    dataset: D.SegmentationFolder,
    class_names: list[str],
    settings: InferenceSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    ddp: Dist | None = None,
    batch_size: int = 8,
) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU/Acc (percent) of `model` on `dataset`, one confusion matrix,
    predictions at each label's own size; plus "skipped" / "first_unreadable" (undecodable images)."""
    settings = settings or InferenceSettings()
    ddp, device = ddp or Dist(), torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), ddp.rank, ddp.world),
        collate_fn=D.collate_list,
    )
    k = len(class_names)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    skipped, first_bad = 0, None
    for batch, bad in loader:
        skipped += len(bad)
        first_bad = first_bad or (bad[0] if bad else None)
        if batch is None:
            continue
        images, masks, _ = batch
        scores = predict_logits(model, [im.to(device) for im in images], settings)
        for s, mask in zip(scores, masks):
            confusion += confusion_matrix(s.argmax(0).cpu(), mask, k, dataset.ignore_index)
    model.train(was_training)
    ddp.all_sum(confusion)
    skipped = sum(ddp.gather([skipped]))
    return {**metrics(confusion, class_names), "skipped": skipped, "first_unreadable": first_bad}


# ---------------------------------------------------------------------------------------------
# Trained segmenters


@dataclass
class LoadedSegmenter:
    model: torch.nn.Module
    classes: list[str]
    palette: list[list[int]]
    spec: dict
    settings: dict  # the run's evaluation settings (img_size, mode, crop, stride)
    train_config: dict
    path: Path


def load_segmenter(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedSegmenter:
    """A segmenter saved by `swinx segment train` (a run directory or its .safetensors), in eval mode."""
    from swinx.segmentation.train import build_segmenter

    path = resolve_checkpoint(path)
    meta, tensors = read_task_model(path, "segmentation", "for classifiers use swinx eval, for detectors swinx detect")
    spec = json.loads(meta["segmenter"])
    model = build_segmenter(spec)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the segmenter it describes: {str(e).splitlines()[0]}") from e
    model.to(device).eval()
    classes = json.loads(meta["classes"])
    return LoadedSegmenter(
        model,
        classes,
        json.loads(meta.get("palette", "null")) or D.default_palette(len(classes)),
        spec,
        json.loads(meta.get("eval_settings", "{}")),
        json.loads(meta.get("train_config", "{}")),
        path,
    )


@torch.no_grad()
def predict(
    loaded: LoadedSegmenter,
    images: list[str | os.PathLike],
    settings: InferenceSettings,
    out_dir: str | os.PathLike | None = None,
    alpha: float = 0.5,
) -> list[dict]:
    """Per image file: its size, the share of pixels of each class present, and with `out_dir` the
    index PNG (`<stem>.png`, palette-coloured class indices) and the overlay (`<stem>_overlay.png`,
    torchvision's draw_segmentation_masks). An undecodable file gives {"image", "error"}."""
    from torchvision.transforms.v2 import functional as TF

    model = loaded.model
    device = next(model.parameters()).device
    results = []
    for path in images:
        try:
            image = TF.pil_to_tensor(open_image(path, 3))
        except READ_ERRORS as e:
            results.append({"image": str(path), "error": f"cannot read image: {e}"})
            continue
        scores = predict_logits(model, [TF.to_dtype(image, torch.float32, scale=True).to(device)], settings)[0]
        labels = scores.argmax(0).cpu()
        counts = torch.bincount(labels.flatten(), minlength=len(loaded.classes))
        item = {
            "image": str(path),
            "width": image.shape[-1],
            "height": image.shape[-2],
            "classes": {
                loaded.classes[i]: round(100.0 * int(n) / labels.numel(), 2) for i, n in enumerate(counts) if n
            },
        }
        if out_dir is not None:
            item["mask"], item["overlay"] = write_prediction(
                image, labels, loaded, Path(out_dir) / Path(path).stem, alpha
            )
        results.append(item)
    return results


def write_prediction(image: torch.Tensor, labels: torch.Tensor, loaded: LoadedSegmenter, stem: Path, alpha: float):
    """`<stem>.png` (palette PNG of the class indices) and `<stem>_overlay.png`, both atomic."""
    import numpy as np
    from PIL import Image
    from torchvision.io import write_png
    from torchvision.utils import draw_segmentation_masks

    stem.parent.mkdir(parents=True, exist_ok=True)
    index = Image.fromarray(labels.numpy().astype(np.uint8), "P")
    index.putpalette([v for colour in loaded.palette for v in colour])
    mask_path, overlay_path = stem.with_suffix(".png"), stem.with_name(stem.name + "_overlay.png")
    atomic_write(mask_path, lambda tmp: index.save(tmp, format="PNG"))
    k = len(loaded.classes)
    present = [i for i in range(k) if (labels == i).any() and any(loaded.palette[i])]  # black classes left clear
    masks = torch.stack([labels == i for i in present]) if present else torch.zeros(0, *labels.shape, dtype=torch.bool)
    colours = [tuple(loaded.palette[i]) for i in present]
    overlay = draw_segmentation_masks(image, masks, alpha=alpha, colors=colours) if present else image
    atomic_write(overlay_path, lambda tmp: write_png(overlay, str(tmp)))
    return str(mask_path), str(overlay_path)


def eval_dataset(loaded: LoadedSegmenter, data: str | os.PathLike | None) -> D.SegmentationFolder:
    """The validation split of `data` (else its train split), or the held-out digit scenes when None."""
    from swinx.segmentation import scenes

    cfg = loaded.train_config
    root = Path(data) if data is not None else scenes.ensure_scenes(scenes.scenes_dir())
    split = D.find_split(root, "val") or D.find_split(root, "train")
    if split is None:
        raise DataError(f"{root} has no images/val (or images/train) with annotations/ beside it")
    return D.SegmentationFolder(
        *split,
        num_classes=len(loaded.classes),
        ignore_index=cfg.get("ignore_index", D.IGNORE_INDEX),
        reduce_zero_label=cfg.get("reduce_zero_label", False),
    )
