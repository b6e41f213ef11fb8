"""What the server needs from each task: preprocess one image, run a batch, answer one request.

`load_served(checkpoint)` reads the checkpoint's task (a swinx detector or segmenter says so in
its metadata; anything else is a classifier source: run directory, file, model directory, hub id)
and returns a `Served`. Classifier images are preprocessed to the model's input size, so they
all batch together; detectors and segmenters keep each image's size and the batcher groups
equal sizes (outputs equal one-by-one inference: no padding between images of a batch).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class Served:
    task: str  # classification | detection | segmentation
    classes: list[str]
    channels: int
    preprocess: Callable[[Image.Image], torch.Tensor]
    run: Callable[[list[torch.Tensor]], list]
    answer: Callable[[object, str, tuple[int, int]], dict]  # (output, image name, (width, height)) -> JSON
    info: dict  # /model
    loaded: object  # the task's own loaded model (classification: Loaded, for the pictures)
    config: object  # the Swin config (of the backbone for dense tasks)


def load_served(checkpoint: str, device: str = "cpu", topk: int = 5, threshold: float = 0.5) -> Served:
    from swinx.engine.rundir import resolve_checkpoint
    from swinx.weights.checkpoint import CheckpointError, read_metadata

    task = None
    try:
        path = resolve_checkpoint(checkpoint)
        if path.suffix == ".safetensors":
            task = read_metadata(path).get("task")
    except CheckpointError:
        pass  # not a local swinx file: a model directory or a hub id, read as a classifier
    if task == "detection":
        return detector(checkpoint, device, threshold)
    if task == "segmentation":
        return segmenter(checkpoint, device)
    return classifier(checkpoint, device, topk)


def classifier(checkpoint: str, device: str, topk: int) -> Served:
    from swinx.classification.inference import load_for_inference, top_k, transform_for_spec

    loaded = load_for_inference(checkpoint, device)
    model, names, k = loaded.model.eval(), loaded.class_names, min(topk, len(loaded.class_names))

    def run(images: list[torch.Tensor]) -> list:
        with torch.inference_mode():
            probs = model(torch.stack(images).to(next(model.parameters()).device)).float().softmax(-1).cpu()
        return top_k(probs, names, k)

    info = {"config": model.config.to_dict(), "preprocessing": loaded.input}
    return Served(
        "classification",
        names,
        loaded.input["channels"],
        transform_for_spec(loaded.input),
        run,
        lambda top, name, size: {"image": name, "top": top},
        info,
        loaded,
        model.config,
    )


def _to_float(image: Image.Image) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)


def detector(checkpoint: str, device: str, threshold: float) -> Served:
    from swinx.detection.inference import load_detector

    loaded = load_detector(checkpoint, device)
    model = loaded.model

    def run(images: list[torch.Tensor]) -> list:
        with torch.inference_mode():
            outs = model([im.to(next(model.parameters()).device) for im in images])
        return [{k: v.cpu() for k, v in out.items()} for out in outs]

    def answer(out: dict, name: str, size: tuple[int, int]) -> dict:
        keep = out["scores"] >= threshold
        detections = [
            {
                "class": loaded.classes[int(label) - 1],
                "label": int(label),
                "score": round(float(score), 4),
                "box": [round(float(v), 1) for v in box],
            }
            for box, label, score in zip(out["boxes"][keep], out["labels"][keep], out["scores"][keep])
        ]
        return {"image": name, "width": size[0], "height": size[1], "detections": detections}

    backbone = _swin_config(model)
    info = {"config": backbone.to_dict() if backbone else None, "detector": loaded.spec, "score_threshold": threshold}
    return Served("detection", loaded.classes, 3, _to_float, run, answer, info, loaded, backbone)


def segmenter(checkpoint: str, device: str) -> Served:
    from swinx.segmentation.inference import InferenceSettings, load_segmenter, predict_logits

    loaded = load_segmenter(checkpoint, device)
    settings = InferenceSettings()  # whole image at its own size

    def run(images: list[torch.Tensor]) -> list:
        device = next(loaded.model.parameters()).device
        with torch.inference_mode():
            scores = predict_logits(loaded.model, [im.to(device) for im in images], settings)
        return [s.argmax(0).cpu() for s in scores]

    def answer(labels: torch.Tensor, name: str, size: tuple[int, int]) -> dict:
        counts = torch.bincount(labels.flatten(), minlength=len(loaded.classes))
        mask = Image.fromarray(labels.numpy().astype("uint8"), "P")
        mask.putpalette([v for colour in loaded.palette for v in colour])
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        shares = {loaded.classes[i]: round(100.0 * int(n) / labels.numel(), 2) for i, n in enumerate(counts) if n}
        return {
            "image": name,
            "width": size[0],
            "height": size[1],
            "classes": shares,
            "mask_png": base64.b64encode(buffer.getvalue()).decode(),  # class indices, palette-coloured
        }

    backbone = _swin_config(loaded.model)
    info = {"config": backbone.to_dict() if backbone else None, "segmenter": loaded.spec, "palette": loaded.palette}
    return Served("segmentation", loaded.classes, 3, _to_float, run, answer, info, loaded, backbone)


def _swin_config(model: torch.nn.Module):
    from swinx.model.backbone import SwinBackbone

    return next((m.config for m in model.modules() if isinstance(m, SwinBackbone)), None)
