"""Evaluate and predict with a trained checkpoint: the back end of `swinx eval` and `swinx predict`."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from swinx.classification import data as D
from swinx.engine.data import SkippingCollate
from swinx.engine.rundir import resolve_checkpoint  # noqa: F401 - part of this module's API
from swinx.model.swin import SwinTransformer
from swinx.weights.checkpoint import CheckpointError, load_model, read_metadata


@dataclass
class Loaded:
    """A model ready to run, with what it needs to preprocess images the way validation did."""

    model: SwinTransformer
    class_names: list[str]
    input: dict
    train_config: dict | None
    path: Path


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu") -> Loaded:
    """Load a run directory or our safetensors (config, classes, input spec in the metadata), or any
    other source `create_model(pretrained=...)` reads: a checkpoint of any layout, a transformers or
    timm model directory, a hub id (their class names and preprocessing come along)."""
    from swinx.weights.directories import is_model_dir
    from swinx.weights.sources import load_pretrained

    given = Path(path)
    if given.is_file() or (given.is_dir() and not is_model_dir(given)):
        path = resolve_checkpoint(given)  # a run directory: its best weights
    metadata = read_metadata(path) if Path(path).suffix == ".safetensors" and Path(path).is_file() else {}
    if metadata.get("format") == "swinx":
        model = load_model(path)
        spec = json.loads(metadata["input"]) if "input" in metadata else None
        train_config = json.loads(metadata["train_config"]) if "train_config" in metadata else None
    else:
        model = load_pretrained(path)
        spec = {k: v for k, v in model.pretrained_cfg.items() if k not in ("source", "origin")}
        train_config = None
    spec = spec or default_input_spec(model.config)
    names = model.class_names or [f"class {i}" for i in range(model.num_classes)]
    return Loaded(model.to(device).eval(), list(names), spec, train_config, Path(path))


def default_input_spec(config) -> dict:
    """The preprocessing of a checkpoint that does not record its own: ImageNet statistics
    for RGB models (MNIST's for others), resize to size / 0.875, centre crop, bicubic."""
    rgb = config.in_chans == 3
    return {
        "img_size": config.img_hw[0],
        "channels": config.in_chans,
        "mean": list(D.IMAGENET_MEAN if rgb else D.MNIST_MEAN * config.in_chans),
        "std": list(D.IMAGENET_STD if rgb else D.MNIST_STD * config.in_chans),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
    }


def transform_for(loaded: Loaded):
    return transform_for_spec(loaded.input)


def transform_for_spec(s: dict):
    """The validation preprocessing that an input spec (a checkpoint's metadata) describes."""
    return D.eval_transform(
        s["img_size"], s["mean"], s["std"], crop_pct=s["crop_pct"], interpolation=s["interpolation"]
    )


@torch.inference_mode()
def predict(loaded: Loaded, images: list[str | os.PathLike], topk: int = 5, batch_size: int = 32) -> list[dict]:
    """Top-k classes for each image file; an unreadable file gets an `error` entry instead."""
    device = next(loaded.model.parameters()).device
    return _predict(
        lambda batch: loaded.model(batch.to(device)), loaded.input, loaded.class_names, images, topk, batch_size
    )


def predict_onnx(
    path: str | os.PathLike, images: list[str | os.PathLike], topk: int = 5, batch_size: int = 32
) -> list[dict]:
    """`predict` with an ONNX file from `swinx export`: onnxruntime runs the network, and the
    preprocessing and class names come from the file's metadata."""
    from swinx.tools.export import ExportError, onnx_session, read_onnx_metadata

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file {path} does not exist")
    session = onnx_session(path)
    info = read_onnx_metadata(session)
    if "input" not in info:
        raise ExportError(f"{path} has no swinx metadata (preprocessing, classes): export it with `swinx export`")
    classes = info.get("class_names") or [f"class {i}" for i in range(session.get_outputs()[0].shape[-1])]
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: batch.numpy()})[0])

    return _predict(run, info["input"], classes, images, topk, batch_size)


def top_k(probs: torch.Tensor, class_names: list[str], k: int) -> list[list[dict]]:
    """Per row of (N, classes) probabilities: the k best as [{"class", "index", "probability"}, ...]."""
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [{"class": class_names[i], "index": i, "probability": p} for p, i in zip(v, ix)]
        for v, ix in zip(values.tolist(), indices.tolist())
    ]


def _predict(run, spec: dict, class_names: list[str], images, topk: int, batch_size: int) -> list[dict]:
    transform = transform_for_spec(spec)
    k = min(topk, len(class_names))
    results: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        probs = run(torch.stack([t for _, t in pending])).float().softmax(-1)
        for (slot, _), top in zip(pending, top_k(probs, class_names, k)):
            results[slot]["top"] = top
        pending.clear()

    for path in images:
        results.append({"image": str(path)})
        try:
            image = D.open_image(path, spec["channels"])
        except FileNotFoundError:
            results[-1]["error"] = "file does not exist"
            continue
        except D.READ_ERRORS as e:
            results[-1]["error"] = f"cannot decode image ({type(e).__name__}: {e})"
            continue
        pending.append((len(results) - 1, transform(image)))
        if len(pending) == batch_size:
            flush()
    flush()
    return results


def eval_dataset(loaded: Loaded, data: str | os.PathLike | None):
    """The images `swinx eval` scores: an ImageFolder split, or the run's own validation data."""
    if data is None:
        config = loaded.train_config or {}
        if config.get("data"):
            data = config["data"]
        elif loaded.train_config is not None:
            _, val, _ = D.mnist5k()
            val.transform = transform_for(loaded)
            return val, "the built-in MNIST held-out split (1,000 digits)"
        else:
            raise D.DataError("this checkpoint does not say what it was trained on; pass --data DIR")
    root = D.eval_folder(data)
    classes = D.scan_classes(root)
    known = {name: i for i, name in enumerate(loaded.class_names)}
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise D.DataError(
            f"{root} has class folders {unknown} that the model does not know; "
            f"its classes are {loaded.class_names[:20]}{' ...' if len(known) > 20 else ''}"
        )
    dataset = D.ImageFolder(root, loaded.class_names, loaded.input["channels"], transform_for(loaded))
    return dataset, str(root)


def plot_confusion(confusion: torch.Tensor, class_names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix (true class down, predicted across), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from swinx.weights.checkpoint import atomic_write

    n = len(class_names)
    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="confusion (row-normalised)")
    ax.set_xticklabels(class_names, rotation=90, fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "cpu",
    confusion_png: str | os.PathLike | None = None,
) -> dict:
    """Top-1, top-5, loss and per-class accuracy of a checkpoint on an ImageFolder split (or the
    data it was trained on), with a confusion-matrix PNG (beside the checkpoint by default, for
    up to 50 classes)."""
    from swinx.classification.train import evaluate
    from swinx.engine.loop import data_loader

    loaded = load_for_inference(checkpoint, device)
    dataset, where = eval_dataset(loaded, data)
    loader = data_loader(dataset, batch_size, None, workers, SkippingCollate())
    result = evaluate(loaded.model, loader, len(loaded.class_names), torch.device(device))
    if result["count"] == 0:
        raise D.DataError(f"no readable images in {where}")
    per_class = {name: acc for name, acc in zip(loaded.class_names, result["per_class"]) if not math.isnan(acc)}
    report = {
        "checkpoint": str(loaded.path),
        "data": where,
        "images": result["count"],
        "skipped_images": result["skipped"],
        "loss": result["loss"],
        "acc1": result["acc1"],
        "acc5": result["acc5"],
        "per_class_acc1": per_class,
    }
    out = Path(confusion_png) if confusion_png else None
    if out is None and len(loaded.class_names) <= 50:
        out = loaded.path.parent / f"confusion-{loaded.path.stem}.png"
    if out is not None:
        plot_confusion(result["confusion"], loaded.class_names, out)
        report["confusion_png"] = str(out)
    return report
