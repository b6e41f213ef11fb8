"""Image classification on the shared engine: ImageFolder trees or the built-in MNIST digits,
the paper's recipe (recipe.py), top-1/top-5 validation, our safetensors weights.

`train(TrainConfig(...))` is the whole job; `swinx train` builds the config from a YAML file
and flags (see recipe.py), and the engine (swinx.engine) runs it: resume, DDP, EMA, AMP,
the run directory.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from swinx.classification import data as D
from swinx.classification.recipe import (
    TrainConfig,
    TrainError,
    finetune_param_groups,
    fit_to_data,
    freeze,
    mix_transform,
    soft_cross_entropy,
    summarise,
    warmup_cosine,
)
from swinx.engine.data import ShardSampler, SkippingCollate
from swinx.engine.loop import Best, Dist, Engine, data_loader, run
from swinx.model.swin import SwinTransformer
from swinx.model.variants import create_model
from swinx.weights.checkpoint import CheckpointError, load_checkpoint, save_model

logger = logging.getLogger("swinx")

# ---------------------------------------------------------------------------------------------
# Data and model


@dataclass
class Data:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    classes: list[str]
    batch_transform: Callable | None = None  # the training augmentation, when it runs on whole batches


def build_data(cfg: TrainConfig) -> Data:
    train_tf = D.train_transform(
        cfg.img_size,
        cfg.mean,
        cfg.std,
        crop_scale=cfg.crop_scale,
        hflip=cfg.hflip,
        auto_augment=cfg.auto_augment,
        randaug_magnitude=cfg.randaug_magnitude,
        reprob=cfg.reprob,
        interpolation=cfg.interpolation,
    )
    val_tf = D.eval_transform(cfg.img_size, cfg.mean, cfg.std, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    if cfg.data is None:
        train, val, classes = D.mnist5k()
        val.transform = val_tf
        if crop_only(cfg):  # the MNIST preset: in-memory images, cropped a batch at a time
            crop = D.BatchResizedCrop(
                cfg.img_size, cfg.mean, cfg.std, (cfg.crop_scale, 1.0), interpolation=cfg.interpolation
            )
            return Data(train, val, classes, crop)
        train.transform = train_tf
        return Data(train, val, classes)
    train_dir, val_dir, classes = D.folder_splits(cfg.data)
    train = D.ImageFolder(train_dir, classes, cfg.in_chans, train_tf)
    val = D.ImageFolder(val_dir, classes, cfg.in_chans, val_tf) if val_dir is not None else None
    return Data(train, val, classes)


def crop_only(cfg: TrainConfig) -> bool:
    """The augmentation is a random resized crop with a square output of at least the images' side
    (MNIST's 28), which `BatchResizedCrop` computes for the whole batch."""
    return (
        cfg.hflip == 0
        and cfg.auto_augment == "none"
        and cfg.reprob == 0
        and cfg.img_size >= 28
        and cfg.interpolation in ("bicubic", "bilinear")
    )


def build_model(cfg: TrainConfig, num_classes: int) -> SwinTransformer:
    overrides = dict(cfg.model_args)
    overrides.update(
        num_classes=num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path
    )
    if cfg.window_size is not None:
        overrides["window_size"] = cfg.window_size
    try:
        return create_model(cfg.model, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"cannot build model {cfg.model!r} with {overrides}: {e}") from e


def frozen_parts(cfg: TrainConfig, model: SwinTransformer) -> list[str]:
    """Names of the submodules and parameters that --freeze-stages / --linear-probe freeze.

    --linear-probe: everything but the head (`head`, and the dropout before it); --freeze-stages N:
    the patch embedding, the absolute position embedding and stages 1..N (`layers.0` ..
    `layers.N-1`, each with its patch merging), as SwinBackbone's frozen_stages = N does.
    """
    stages = len(model.layers)
    if not 0 <= cfg.freeze_stages <= stages:
        raise TrainError(
            f"freeze_stages {cfg.freeze_stages}: {cfg.model} has {stages} stages; "
            f"give 0 (nothing frozen) .. {stages} (every stage)"
        )
    if cfg.linear_probe:
        modules = [name for name, _ in model.named_children() if name not in ("head", "head_drop")]
        return modules + [name for name, _ in model.named_parameters(recurse=False)]
    if cfg.freeze_stages == 0:
        return []
    parts = ["patch_embed", "pos_drop"] + [f"layers.{i}" for i in range(cfg.freeze_stages)]
    return parts + (["absolute_pos_embed"] if model.absolute_pos_embed is not None else [])


# ---------------------------------------------------------------------------------------------
# Evaluation (shared with `swinx eval`)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    ddp: Dist | None = None,
) -> dict:
    """Loss, top-1/top-5 (percent), per-class counts and the confusion matrix, summed over ranks."""
    ddp = ddp or Dist()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    k = min(5, num_classes)
    first_bad = None
    for batch, bad in loader:
        skipped += len(bad)
        first_bad = first_bad or (bad[0] if bad else None)
        if batch is None:
            continue
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        predicted = logits.argmax(1)
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view_as(confusion)
        top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
    for t in (loss_sum, confusion, top5, skipped):
        ddp.all_sum(t)
    model.train(was_training)
    count = int(confusion.sum())
    correct_per_class = confusion.diag().cpu()
    count_per_class = confusion.sum(1).cpu()
    return {
        "loss": float(loss_sum) / max(count, 1),
        "acc1": 100.0 * float(correct_per_class.sum()) / max(count, 1),
        "acc5": 100.0 * float(top5) / max(count, 1),
        "count": count,
        "skipped": int(skipped),
        "first_unreadable": first_bad,
        "per_class": [
            100.0 * float(c) / float(n) if n else float("nan") for c, n in zip(correct_per_class, count_per_class)
        ],
        "confusion": confusion.cpu(),
    }


# ---------------------------------------------------------------------------------------------
# The task


class ClassificationTask:
    """What classification plugs into the engine (see swinx.engine.loop.Task)."""

    score_key = "val_acc1"

    def __init__(self, cfg: TrainConfig, chosen: set[str] | None = None):
        self.cfg, self.chosen = cfg, chosen

    def build(self, ddp: Dist, device: torch.device) -> None:
        fitted = self.cfg.data is not None and self.chosen is not None
        if fitted:
            self.cfg, why = fit_to_data(self.cfg, self.chosen, summarise_folder(self.cfg.data))
            if ddp.main:
                logger.info(why)
        if self.cfg.init and self.chosen is not None and not {"mean", "std"} & self.chosen:
            self.cfg = self.source_statistics(self.cfg, ddp)
        cfg = self.cfg
        self.ddp = ddp
        self.data = build_data(cfg)
        self.classes = self.data.classes
        self.num_classes = len(self.classes)
        self.model = build_model(cfg, self.num_classes)
        freeze(self.model, frozen_parts(cfg, self.model))
        # Every run uses a DistributedSampler, even with one process, so that one process at batch B
        # sees the same global batches as N processes at B/N.
        sampler = DistributedSampler(
            self.data.train, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg.seed
        )
        self.train_loader = data_loader(
            self.data.train,
            cfg.batch_size,
            sampler,
            cfg.workers,
            SkippingCollate(),
            drop_last=len(sampler) >= 2 * cfg.batch_size,
        )
        self.val_loader = None
        if self.data.val is not None:
            shard = ShardSampler(len(self.data.val), ddp.rank, ddp.world)
            self.val_loader = data_loader(self.data.val, cfg.batch_size, shard, cfg.workers, SkippingCollate())
        self.mixer = mix_transform(cfg, self.num_classes)
        if fitted and ddp.main:
            logger.info(probe_estimate(self.model, cfg, len(self.train_loader), len(self.data.val or ()), device))

    @staticmethod
    def source_statistics(cfg: TrainConfig, ddp: Dist) -> TrainConfig:
        """Fine-tuning keeps the normalisation the weights were trained with (as timm's
        resolve_data_config does): the --init source's mean and std, where it records them."""
        import dataclasses

        from swinx.weights.sources import resolve

        try:
            spec = resolve(cfg.init).preprocessing
        except CheckpointError as e:
            raise TrainError(f"--init {cfg.init}: {e}") from e
        if (
            not spec
            or len(spec["mean"]) != cfg.in_chans
            or (list(cfg.mean), list(cfg.std)) == (spec["mean"], spec["std"])
        ):
            return cfg
        if ddp.main:
            logger.info(f"normalising with --init's mean {spec['mean']} and std {spec['std']} (--mean/--std to change)")
        return dataclasses.replace(cfg, mean=tuple(spec["mean"]), std=tuple(spec["std"]))

    def initialise(self, init: str) -> str:
        """Load --init weights (any layout); returns the load report."""
        try:
            return str(load_checkpoint(self.model, init))
        except CheckpointError as e:
            raise TrainError(f"--init {init}: {e}") from e

    def base_lr(self, global_batch: int) -> float:
        self.lr_scale = global_batch / 512  # the recipe's learning rates are per 512 images
        return self.cfg.lr * self.lr_scale

    def param_groups(self) -> list[dict]:
        """The trainable parameters' AdamW groups: weight decay as `param_groups`, plus the layer-wise
        decay and head rate of --layer-decay / --head-lr (see `finetune_param_groups`)."""
        cfg, scale = self.cfg, self.lr_scale
        head_lr = cfg.head_lr * scale if cfg.head_lr is not None else None
        return finetune_param_groups(self.model, cfg.weight_decay, cfg.lr * scale, cfg.layer_decay, head_lr)

    def lr_lambda(self, base_lr: float, steps_per_epoch: int):
        cfg, scale = self.cfg, self.lr_scale
        return warmup_cosine(
            base_lr,
            cfg.min_lr * scale,
            cfg.warmup_lr * scale,
            round(cfg.warmup_epochs * steps_per_epoch),
            cfg.epochs * steps_per_epoch,
        )

    def loss(self, net: torch.nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if self.data.batch_transform is not None:
            images = self.data.batch_transform(images)
        targets = labels
        if self.mixer is not None:
            images, targets = self.mixer(images, labels)
        return soft_cross_entropy(net(images), targets, self.cfg.label_smoothing), len(labels)

    def validate(self, model: torch.nn.Module, ddp: Dist, device: torch.device, dtype, epoch: int) -> dict:
        if self.val_loader is None:
            return {"val_loss": None, "val_acc1": None, "val_acc5": None}
        result = evaluate(model, self.val_loader, self.num_classes, device, dtype, ddp)
        return {
            "val_loss": result["loss"],
            "val_acc1": result["acc1"],
            "val_acc5": result["acc5"],
            "skipped": result["skipped"],
            "first_unreadable": result["first_unreadable"],
        }

    def save_weights(self, model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
        extra = {"train_config": json.dumps(self.cfg.to_dict()), "input": json.dumps(input_spec(self.cfg))}
        save_model(model, path, self.classes, {**extra, **metadata})

    def extra_state(self) -> dict:
        return {"small_map": self.model.small_map}

    def load_extra_state(self, state: dict) -> None:
        self.model.small_map = state["small_map"]  # --init may have switched it (torchvision weights)

    def describe(self, engine: Engine) -> str:
        c, cfg = self.model.config, self.cfg
        return (
            f"training {cfg.model} (V{c.version}, patch {c.patch_size}, embed {c.embed_dim}, depths {c.depths}, "
            f"window {c.window_size}: {sum(p.numel() for p in self.model.parameters()):,} parameters) on "
            f"{len(self.data.train):,} images, {self.num_classes} classes, {engine.ddp.world} process(es) on "
            f"{engine.device}, global batch {engine.global_batch}, lr {engine.lr:.2e}{self.finetune_note()}"
        )

    def finetune_note(self) -> str:
        """The fine-tuning settings in force, for the description line ("" when none is)."""
        cfg, notes = self.cfg, []
        if cfg.head_lr is not None:
            notes.append(f"head lr {cfg.head_lr * self.lr_scale:.2e}")
        if cfg.layer_decay != 1:
            notes.append(f"layer decay {cfg.layer_decay:g} over {sum(self.model.config.depths) + 2} layers")
        if cfg.linear_probe:
            notes.append("linear probe, all but the head frozen")
        elif cfg.freeze_stages:
            n = cfg.freeze_stages
            notes.append(f"patch embedding and stage{'s 1-' if n > 1 else ' '}{n} frozen")
        if cfg.linear_probe or cfg.freeze_stages:
            total = sum(p.numel() for p in self.model.parameters())
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            notes[-1] += f" ({trainable:,} of {total:,} parameters trainable)"
        return "".join(f", {note}" for note in notes)

    def epoch_line(self, row: dict) -> str:
        line = (
            f"epoch {row['epoch']}/{self.cfg.epochs}  train_loss {row['train_loss']:.4f}  "
            f"val_loss {_fmt(row['val_loss'], '.4f')}  top-1 {_fmt(row['val_acc1'], '.2f')}%  "
            f"top-5 {_fmt(row['val_acc5'], '.2f')}%"
        )
        if row.get("ema_val_acc1") is not None:
            line += f"  EMA top-1 {row['ema_val_acc1']:.2f}%"
        return line + f"  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s ({row['images_per_second']:.0f} img/s)"

    def final_line(self, last: dict, best: Best, run_path: Path) -> str:
        if last.get("val_acc1") is None:
            return f"done: no validation split; checkpoints in {run_path}"
        return (
            f"done: final val top-1 {last['val_acc1']:.2f}% (best {best.acc1:.2f}% at epoch {best.epoch}, "
            f"{best.weights} weights); checkpoints in {run_path}"
        )


def summarise_folder(root: str) -> object:
    """`recipe.summarise` of an ImageFolder tree's training split."""
    train_dir, _, classes = D.folder_splits(root)
    paths = [
        os.path.join(folder, name)
        for c in classes
        for folder, _, files in sorted(os.walk(train_dir / c))
        for name in sorted(files)
        if D.is_image(name)
    ]
    return summarise(paths, len(classes))


def probe_estimate(model: torch.nn.Module, cfg: TrainConfig, batches: int, val_images: int, device) -> str:
    """The run time before training starts, from timing a few training steps of a copy of the model
    on random input of the run's shape (data loading and augmentation are not in it)."""
    net = copy.deepcopy(model).to(device).train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable or [torch.zeros(1, requires_grad=True)])
    x = torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, net.num_classes, (cfg.batch_size,), device=device)
    seconds = []
    for _ in range(4):
        started = time.perf_counter()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    step = statistics.median(seconds[1:])  # the first step warms up
    epoch = step * batches + step / 3 * -(-val_images // cfg.batch_size)  # a forward is about a third of a step
    total = epoch * cfg.epochs
    return (
        f"estimated before training: {total / 60:.1f} min ({epoch:.0f} s per epoch x {cfg.epochs} epochs, from "
        f"timing {len(seconds) - 1} training steps of {step * 1000:.0f} ms; data loading adds to it)"
    )


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def train(
    cfg: TrainConfig, resume: str | Path | None = None, distributed: bool = False, chosen: set[str] | None = None
) -> dict:
    """Run (or resume) classification training; returns the last epoch's metrics (see engine.loop.run).

    `chosen`: the settings the user set (`swinx train` passes them); with `data` given and no model
    or recipe chosen, a small dataset on a CPU gets the small-data preset (recipe.fit_to_data)."""
    task = ClassificationTask(cfg, chosen if resume is None else None)
    return run(task, resume, distributed, default_out=lambda: default_out(task.cfg), resume_command="swinx train")


def default_out(cfg: TrainConfig) -> Path:
    name = cfg.name or (f"{Path(cfg.data).resolve().name}-{cfg.model}" if cfg.data else "mnist")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def input_spec(cfg: TrainConfig) -> dict:
    """What `swinx predict` and `swinx eval` need to preprocess images the way validation did."""
    return {
        "img_size": cfg.img_size,
        "channels": cfg.in_chans,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "crop_pct": cfg.crop_pct,
        "interpolation": cfg.interpolation,
    }
