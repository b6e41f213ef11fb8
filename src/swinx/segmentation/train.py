"""Semantic segmentation on the shared engine.

`train(SegmentConfig(...))` trains UperNet on a Swin backbone (segmentation/model.py) on data in
the ADE20K folder convention (segmentation/data.py), scored by mIoU every `val_every` epochs; the
engine (swinx.engine) runs it: resume, DDP, EMA, AMP, the run directory. With no `data`, the digit
scenes with per-pixel labels (segmentation/scenes.py) are written once and trained on through the
same path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from swinx.engine.config import (
    AMP_NAMES,
    ChildrenExcept,
    TrainError,
    check_engine_settings,
    default_workers,
    param_groups,
    parse_size,
    preset_amp,
    read_settings,
    warmup_poly,
)
from swinx.engine.data import DataError
from swinx.engine.loop import Best, Dist, Engine, data_loader, run
from swinx.segmentation import data as D
from swinx.segmentation import scenes
from swinx.segmentation.inference import InferenceSettings, evaluate_segmenter
from swinx.segmentation.model import NORMS, create_segmenter, parse_segmenter_name
from swinx.weights.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_task_model

logger = logging.getLogger("swinx")
REFERENCE_BATCH = 16  # the recipe's learning rate is for 16 images per step (2 per GPU x 8), scaled linearly


@dataclass
class SegmentConfig:
    """Every setting of a segmentation run. Defaults are the Swin paper's ADE20K recipe (UperNet,
    AdamW 6e-5 at batch 16, wd 0.01, poly decay, 512x512 crops of images rescaled 0.5-2.0x of a
    512 short side, 160k iterations ~ 128 epochs of ADE20K), sized for GPUs; with no `data` the
    digit-scenes preset replaces them, and `--data` on a small dataset picks fitting ones."""

    # data
    data: str | None = None  # images/{train,val} + annotations/{train,val}; None: digit scenes
    num_classes: int | None = None  # None: from the classes file, else the largest label + 1
    classes: str | None = None  # class names (.txt or .json, optionally with a palette); None: ROOT/classes.*
    ignore_index: int = D.IGNORE_INDEX
    reduce_zero_label: bool = False  # ADE20K: label 0 is "other" -> ignored, the rest shift down by one
    # model
    model: str = "swin_t"  # the backbone variant
    model_args: dict = field(default_factory=dict)  # SwinConfig overrides for the backbone
    window_size: int | None = None
    small_map: str = "clamp"  # clamp | pad | pad_shift (OpenMMLab's)
    channels: int = 512  # the UperNet decoder's width
    aux_channels: int = 256  # the auxiliary FCN head's width on stage 3 (0: no auxiliary head)
    aux_weight: float = 0.4
    dropout: float = 0.1  # before each head's classifier
    norm: str = "bn"  # bn | gn, the heads' normalisation
    init: str | None = None  # backbone from a classification (any layout) or OpenMMLab checkpoint, or a segmenter
    frozen_stages: int = -1
    # sizes
    crop_size: str = "512"  # training crops, N or HxW
    base_size: int = 512  # the short side that the random rescale ratio multiplies
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75  # redraw a crop (up to 10 times) while one class covers this much of it
    hflip: float = 0.5
    photometric: bool = True
    img_size: str | None = None  # evaluation size: "416", "608x416" (HxW); None: each image's own
    eval_mode: str = "whole"  # whole | slide, for validation during training
    eval_crop: str | None = None  # slide windows, N or HxW (default: crop_size)
    eval_stride: str | None = None  # slide stride (default: 2/3 of the window, mmsegmentation's 341 for 512)
    eval_sizes: list = field(default_factory=list)  # extra sizes scored after training (eval.json)
    eval_modes: list = field(default_factory=lambda: ["whole"])  # modes scored after training
    # optimisation
    epochs: int = 128
    batch_size: int = 2  # per process, per micro-batch
    accum_steps: int = 1
    lr: float = 6e-5  # for a global batch of 16
    min_lr: float = 0.0
    warmup_lr: float = 6e-11  # mmsegmentation's warm-up ratio 1e-6
    warmup_epochs: float = 1.2  # 1500 iterations of ADE20K at batch 16
    poly_power: float = 1.0
    weight_decay: float = 0.01
    backbone_lr_mult: float = 1.0  # the backbone's learning rate relative to the heads' (1: the paper's)
    clip_grad: float | None = None
    drop_path: float = 0.3
    ema_decay: float = 0.0
    amp: str = "auto"
    grad_checkpointing: bool = False
    val_every: int = 1
    # run
    seed: int = 0
    workers: int | None = None  # None: follow the machine (see default_workers)
    device: str = "auto"
    out: str | None = None
    name: str | None = None
    progress: str = "auto"
    max_bad_images: int | None = None
    threads: int = 0  # CPU compute threads; 0: follow what other processes leave free (engine/threads.py)

    def __post_init__(self):
        if self.workers is None:
            self.workers = default_workers()
        problems = check_engine_settings(self)
        try:
            parse_segmenter_name(f"upernet_{self.model}")
        except KeyError as e:
            problems.append(str(e.args[0]))
        if self.min_lr > self.lr:
            problems.append(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        if not self.backbone_lr_mult > 0:
            problems.append(f"backbone_lr_mult must be positive, got {self.backbone_lr_mult}")
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, got {self.norm!r}")
        elif self.norm == "bn" and self.batch_size < 2:
            problems.append(
                "batch_size 1 with norm bn: BatchNorm in the pyramid pooling's 1x1 branch needs at least 2 "
                "images per process; raise --batch-size or use --norm gn"
            )
        if self.num_classes is not None and self.num_classes < 1:
            problems.append(f"num_classes must be at least 1, got {self.num_classes}")
        if not 0 <= self.ignore_index <= 65535:
            problems.append(f"ignore_index must be a label value in 0..65535, got {self.ignore_index}")
        if len(self.ratio_range) != 2 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            problems.append(f"ratio_range must be [low, high] with 0 < low <= high, got {self.ratio_range}")
        if self.base_size < 32:
            problems.append(f"base_size must be at least 32, got {self.base_size}")
        if self.eval_mode not in ("whole", "slide") or not set(self.eval_modes) <= {"whole", "slide"}:
            problems.append(f"eval modes must be whole or slide, got {self.eval_mode!r} and {self.eval_modes}")
        if self.val_every < 1:
            problems.append(f"val_every must be at least 1, got {self.val_every}")
        try:
            for size in [self.crop_size, self.img_size, self.eval_crop, self.eval_stride, *self.eval_sizes]:
                if size is not None:
                    parse_size(size)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise TrainError("invalid segmentation settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SegmentConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown segmentation setting(s) {unknown}; valid settings: {sorted(known)}")
        return cls(**d)

    def inference(self, size: str | None = "run", mode: str | None = None) -> InferenceSettings:
        """The inference settings of this run's evaluation (`size` "run": img_size; None: native)."""
        size = self.img_size if size == "run" else size
        crop = parse_size(self.eval_crop or self.crop_size)
        stride = (
            parse_size(self.eval_stride)
            if self.eval_stride
            else (math.ceil(crop[0] * 2 / 3), math.ceil(crop[1] * 2 / 3))
        )
        return InferenceSettings(
            size=parse_size(size) if size is not None else None,
            mode=mode or self.eval_mode,
            crop=crop,
            stride=stride,
            batch_size=self.batch_size,
        )


# The built-in default: UperNet (width 64, auxiliary head 32, BatchNorm) on a small Swin (embed 32,
# depths 2-2-2-2, heads 1-2-4-8, window 7), its backbone first pretrained on the MNIST training
# digits (`init="digits"`, the stand-in for the paper's ImageNet-pretrained backbone; about 1.5 min,
# once) and fine-tuned at a quarter of the heads' learning rate. 1,500 digit scenes of 256 px
# rescaled around the 416 px of the evaluation (short side 312-520) and cropped to 192x192 (redrawn
# while one class covers 75% of a crop), no flips (digits are not mirror images), no colour jitter,
# AdamW 2e-3 at batch 8 with a poly schedule, 6 epochs, bf16 on a CPU with native bf16. Scored at
# 416x416 whole (during training) and sliding, then at 608x608 and 600x424 after training.
SCENES_PRESET = dict(
    model="swin_t",
    model_args=dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8]),
    channels=64,
    aux_channels=32,
    norm="bn",
    init="digits",
    backbone_lr_mult=0.25,
    crop_size="192",
    base_size=416,
    ratio_range=[0.75, 1.25],
    cat_max_ratio=0.75,
    hflip=0.0,
    photometric=False,
    img_size="416",
    eval_crop="256",
    eval_stride="160",
    eval_sizes=["608", "600x424"],
    eval_modes=["whole", "slide"],
    epochs=6,
    batch_size=8,
    lr=4e-3,
    warmup_lr=1e-6,
    warmup_epochs=0.3,
    min_lr=0.0,
    weight_decay=0.01,
    drop_path=0.1,
    val_every=3,
    clip_grad=10.0,
)


def scenes_preset() -> dict:
    """SCENES_PRESET, with the presets' precision (`preset_amp`: bf16 autocast on a CPU with native
    bf16, validation staying float32; float32 elsewhere)."""
    return dict(SCENES_PRESET, amp=preset_amp())


def resolve_config(yaml_path: str | None = None, overrides: dict | None = None) -> SegmentConfig:
    """Defaults, then the digit-scenes preset when no data is given, then a YAML file, then flags.
    (With --data and no model or recipe chosen, `fit_to_data` adapts the settings when training starts.)"""
    settings = read_settings(yaml_path, overrides)
    base = {} if settings.get("data") else scenes_preset()
    base.update(settings)
    return SegmentConfig.from_dict(base)


# ---------------------------------------------------------------------------------------------
# Data and model


def dataset_root(cfg: SegmentConfig) -> Path:
    return Path(cfg.data) if cfg.data else scenes.scenes_dir()


def class_names(cfg: SegmentConfig, root: Path, found: int) -> tuple[list[str], list[list[int]]]:
    """Names and palette: the classes file (--classes, else ROOT/classes.json|txt), else "0".."N-1"."""
    path = Path(cfg.classes) if cfg.classes else D.default_classes_file(root)
    if path is None:
        n = cfg.num_classes or found
        return [str(i) for i in range(n)], D.default_palette(n)
    names, palette = D.read_classes(path)
    if cfg.reduce_zero_label and cfg.classes is None and len(names) == (cfg.num_classes or found) + 1:
        names, palette = names[1:], palette[1:] if palette else None  # the file lists "other" first
    if cfg.num_classes is not None and len(names) != cfg.num_classes:
        raise DataError(f"{path} names {len(names)} classes but --num-classes is {cfg.num_classes}")
    return names, palette or D.default_palette(len(names))


def build_datasets(cfg: SegmentConfig, ddp: Dist | None = None):
    """(train, val or None, class names, palette), every mask checked against the classes."""
    if cfg.data is None and (ddp is None or ddp.main):
        scenes.ensure_scenes(scenes.scenes_dir())
    if ddp is not None and ddp.world > 1:
        torch.distributed.barrier()  # rank 0 writes the scenes, the others wait for them
    root = dataset_root(cfg)
    if not root.is_dir():
        raise DataError(f"--data {root} is not a directory")
    train_split, val_split = D.find_split(root, "train"), D.find_split(root, "val")
    if train_split is None:
        raise DataError(
            f"{root} has no images/train/ (with annotations/train/ beside it): expected the ADE20K / "
            "mmsegmentation layout images/{train,val}/*.jpg and annotations/{train,val}/*.png"
        )
    known = cfg.num_classes
    if known is None:
        path = Path(cfg.classes) if cfg.classes else D.default_classes_file(root)
        if path is not None:
            names, _ = D.read_classes(path)
            known = len(names) - (1 if cfg.reduce_zero_label and cfg.classes is None else 0)
    common = dict(num_classes=known, ignore_index=cfg.ignore_index, reduce_zero_label=cfg.reduce_zero_label)
    crop = parse_size(cfg.crop_size)
    transforms = D.train_transforms(
        crop, cfg.base_size, tuple(cfg.ratio_range), cfg.hflip, cfg.photometric, cfg.cat_max_ratio, cfg.ignore_index
    )
    train = D.SegmentationFolder(*train_split, transforms, **common)
    if known is None:
        common["num_classes"] = train.num_classes
    val = D.SegmentationFolder(*val_split, D.eval_transforms(), **common) if val_split else None
    if val is not None and val.num_classes > train.num_classes:
        raise DataError(
            f"the validation masks have labels up to {val.num_classes - 1}, beyond the training masks' "
            f"{train.num_classes - 1}; give --num-classes"
        )
    names, palette = class_names(cfg, root, train.num_classes)
    return train, val, names, palette


def segmenter_spec(cfg: SegmentConfig, num_classes: int) -> dict:
    """The arguments of `create_segmenter` that rebuild this run's network (saved with the weights)."""
    backbone_args = dict(cfg.model_args, drop_path_rate=cfg.drop_path, small_map=cfg.small_map)
    if cfg.window_size is not None:
        backbone_args["window_size"] = cfg.window_size
    return dict(
        name=f"upernet_{cfg.model}",
        num_classes=num_classes,
        channels=cfg.channels,
        aux_channels=cfg.aux_channels or None,
        norm=cfg.norm,
        dropout=cfg.dropout,
        frozen_stages=cfg.frozen_stages,
        backbone_args=backbone_args,
    )


def build_segmenter(spec: dict) -> torch.nn.Module:
    return create_segmenter(**spec)


# ---------------------------------------------------------------------------------------------
# Fitting the settings to a user's data


def fit_to_data(cfg: SegmentConfig, chosen: set[str], train: D.SegmentationFolder) -> tuple[SegmentConfig, str]:
    """Settings that fit a small dataset and this CPU when the user chose none (as the scenes preset
    does); returns the new config and a message saying what was picked and why. Anything the user set
    (`chosen`) is kept; on a GPU, or for a large dataset, the paper's recipe stays."""
    from PIL import Image

    sizes = []
    for image_path, _ in train.samples[:: max(1, len(train) // 200)]:  # a sample of the sizes is enough
        try:
            with Image.open(image_path) as im:
                sizes.append(im.size)
        except OSError:
            continue
    if not sizes or torch.cuda.is_available() or len(train) > 5000:
        return cfg, ""
    short = statistics.median(min(s) for s in sizes)
    long = statistics.median(max(s) for s in sizes)
    if short > 768:
        return cfg, ""
    side = int(min(320, max(192, round(short / 32) * 32)))
    picked = scenes_preset()
    picked.update(
        crop_size=str(side),
        base_size=int(short),
        ratio_range=[0.75, 1.5],
        hflip=0.5,
        img_size=None,  # each image at its own size: a user's photos are not all square
        eval_crop=str(side),
        eval_stride=str(side * 2 // 3),
        eval_sizes=[],
        eval_modes=["whole"],
        init=None,  # the digit-pretrained backbone suits the digit scenes, not a user's photographs
        backbone_lr_mult=1.0,
    )
    # Twice the crop pixels the scenes preset trains on (about 12 minutes here: a small dataset has no
    # pretrained backbone to start from), in 8 to 80 epochs.
    preset = scenes_preset()
    budget = 2 * scenes.TRAIN_SCENES * preset["epochs"] * parse_size(preset["crop_size"])[0] ** 2 / side**2
    picked["epochs"] = int(max(8, min(80, budget // max(len(train), 1))))
    values = {k: v for k, v in picked.items() if k not in chosen and k != "data"}
    new = dataclasses.replace(cfg, **values)
    if "val_every" not in chosen:
        new = dataclasses.replace(new, val_every=max(1, new.epochs // 4))
    why = (
        f"{len(train)} training images of median {int(short)}x{int(long)} px (short x long side), "
        f"{train.num_classes} classes, no GPU: picked UperNet {new.channels} on a small {new.model} "
        f"(embed {new.model_args.get('embed_dim', '-')}, depths {new.model_args.get('depths', '-')}"
        f"{', from scratch' if not new.init else ''}), {new.crop_size} px crops of images rescaled "
        f"{new.ratio_range[0]}-{new.ratio_range[1]}x, flips, {new.epochs} epochs of batch {new.batch_size} "
        "(twice the compute of the digit-scenes preset's fine-tuning, ~12 min on a 2-core CPU); "
        "choose --model/--epochs/--lr/... to override"
    )
    return new, why


# ---------------------------------------------------------------------------------------------
# The task


class SegmentationTask:
    """What semantic segmentation plugs into the engine (see swinx.engine.loop.Task)."""

    score_key = "val_mIoU"

    def __init__(self, cfg: SegmentConfig, chosen: set[str] | None = None):
        self.cfg, self.chosen = cfg, chosen
        self.results: dict[tuple[int, str], dict] = {}  # validation results by (epoch, model or ema)

    def build(self, ddp: Dist, device: torch.device) -> None:
        try:
            self.train_set, self.val_set, self.classes, self.palette = build_datasets(self.cfg, ddp)
        except DataError as e:
            raise TrainError(str(e)) from e
        if self.cfg.data is not None and self.chosen is not None:
            self.cfg, why = fit_to_data(self.cfg, self.chosen, self.train_set)
            if why and ddp.main:
                logger.info(why)
            crop = parse_size(self.cfg.crop_size)
            c = self.cfg
            self.train_set.transforms = D.train_transforms(
                crop, c.base_size, tuple(c.ratio_range), c.hflip, c.photometric, c.cat_max_ratio, c.ignore_index
            )
        cfg = self.cfg
        self.spec = segmenter_spec(cfg, len(self.classes))
        self.model = build_segmenter(self.spec)
        self.ddp = ddp
        sampler = DistributedSampler(self.train_set, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg.seed)
        self.train_loader = data_loader(
            self.train_set,
            cfg.batch_size,
            sampler,
            cfg.workers,
            D.collate_crops,
            drop_last=len(sampler) >= cfg.batch_size,  # a last batch of one image would break BatchNorm
        )

    def start_epoch(self, epoch: int) -> None:
        """Each sample's augmentation drawn from (seed, epoch, index): N processes at batch B/N see the
        crops one process at batch B does."""
        self.train_set.seed, self.train_set.epoch = self.cfg.seed, epoch

    def initialise(self, init: str) -> str:
        """--init: the backbone from any classification or OpenMMLab checkpoint, a whole swinx segmenter,
        or "digits": pretrained on the MNIST training digits (segmentation/pretrain.py)."""
        from swinx.weights.checkpoint import read_metadata

        if init == "digits":
            from swinx.segmentation.pretrain import digit_backbone

            init = str(digit_backbone(self.cfg.model, self.cfg.model_args, self.cfg.window_size))
        if str(init).endswith(".safetensors") and read_metadata(init).get("task") == "segmentation":
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(init))
            return f"whole segmenter from {init}"
        try:
            return str(load_checkpoint(self.model.backbone, init))
        except CheckpointError as e:
            raise TrainError(f"--init {init}: {e}") from e

    def base_lr(self, global_batch: int) -> float:
        self.lr_scale = global_batch / REFERENCE_BATCH
        return self.cfg.lr * self.lr_scale

    def param_groups(self) -> list[dict]:
        """AdamW groups (no decay on norms, biases, position tables), the heads' first (their rate is
        the one logged); the backbone's rate is `backbone_lr_mult` times theirs, scheduled alike."""
        backbone = param_groups(self.model.backbone, self.cfg.weight_decay)
        for group in backbone:
            group["lr"] = self.cfg.lr * self.lr_scale * self.cfg.backbone_lr_mult
        return param_groups(ChildrenExcept(self.model, "backbone"), self.cfg.weight_decay) + backbone

    def lr_lambda(self, base_lr: float, steps_per_epoch: int):
        cfg, scale = self.cfg, self.lr_scale
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        total = cfg.epochs * steps_per_epoch
        return warmup_poly(base_lr, cfg.min_lr * scale, cfg.warmup_lr * scale, warmup, total, cfg.poly_power)

    def loss(self, net: torch.nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        images, masks, _ = batch
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        out = net(images)
        loss = F.cross_entropy(out["out"].float(), masks, ignore_index=self.cfg.ignore_index)
        if "aux" in out:
            loss = loss + self.cfg.aux_weight * F.cross_entropy(
                out["aux"].float(), masks, ignore_index=self.cfg.ignore_index
            )
        if torch.isnan(loss) and not (masks != self.cfg.ignore_index).any():
            loss = out["out"].sum() * 0.0  # a batch of crops with every pixel ignored teaches nothing
        return loss, len(images)

    def validate(self, model: torch.nn.Module, ddp: Dist, device: torch.device, dtype, epoch: int) -> dict:
        """mIoU every `val_every` epochs and at the last one (None in the other rows), in float32."""
        cfg = self.cfg
        empty = {"val_loss": None, "val_mIoU": None, "val_mAcc": None, "val_aAcc": None}
        if self.val_set is None or (epoch % cfg.val_every and epoch != cfg.epochs):
            return empty
        result = evaluate_segmenter(
            model, self.val_set, self.classes, cfg.inference(), device=device, ddp=ddp, batch_size=cfg.batch_size
        )
        self.results[(epoch, "model" if model is self.model else "ema")] = result
        return {
            **empty,
            "val_mIoU": result["mIoU"],
            "val_mAcc": result["mAcc"],
            "val_aAcc": result["aAcc"],
            "val_IoU": {k: v["IoU"] for k, v in result["per_class"].items()},
            "skipped": result["skipped"],
            "first_unreadable": result["first_unreadable"],
        }

    def save_weights(self, model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
        cfg = self.cfg
        settings = dict(img_size=cfg.img_size, mode=cfg.eval_mode, crop=cfg.eval_crop or cfg.crop_size)
        settings["stride"] = cfg.eval_stride
        meta = {
            "segmenter": json.dumps(self.spec),
            "classes": json.dumps(self.classes),
            "palette": json.dumps(self.palette),
            "eval_settings": json.dumps(settings),
            "train_config": json.dumps(cfg.to_dict()),
            **metadata,
        }
        save_task_model(model, path, "segmentation", meta)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def describe(self, engine: Engine) -> str:
        cfg, c = self.cfg, self.model.backbone.config
        params = sum(p.numel() for p in self.model.parameters())
        return (
            f"training UperNet {cfg.channels} on {cfg.model} (V{c.version}, embed {c.embed_dim}, depths {c.depths}, "
            f"window {c.window_size}: {params:,} parameters) on {len(self.train_set):,} images of "
            f"{dataset_root(cfg)}, {len(self.classes)} classes, crops {cfg.crop_size}, {engine.ddp.world} "
            f"process(es) on {engine.device}, global batch {engine.global_batch}, lr {engine.lr:.2e}, "
            f"{cfg.epochs} epochs, {AMP_NAMES[engine.dtype]}"
        )

    def epoch_line(self, row: dict) -> str:
        line = f"epoch {row['epoch']}/{self.cfg.epochs}  train_loss {row['train_loss']:.4f}"
        if row.get("val_mIoU") is not None:
            line += f"  mIoU {row['val_mIoU']:.2f}  mAcc {row['val_mAcc']:.2f}  aAcc {row['val_aAcc']:.2f}"
        return line + f"  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s ({row['images_per_second']:.1f} img/s)"

    def final_line(self, last: dict, best: Best, run_path: Path) -> str:
        if best.epoch is None:
            return f"done: no validation score; checkpoints in {run_path}"
        return (
            f"done: best mIoU {best.acc1:.2f} at epoch {best.epoch} ({best.weights} weights); checkpoints in {run_path}"
        )


def train(
    cfg: SegmentConfig, resume: str | Path | None = None, distributed: bool = False, chosen: set[str] | None = None
) -> dict:
    """Run (or resume) segmentation training; returns the last epoch's metrics (see engine.loop.run).

    `chosen`: the settings the user set; with `data` given, the others may be fitted to the data.
    """
    task = SegmentationTask(cfg, chosen if resume is None else None)
    out = Path(resume) if resume is not None else Path(cfg.out) if cfg.out else default_out(cfg)
    last = run(task, resume, distributed, default_out=lambda: out, resume_command="swinx segment train")
    main = not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)
    if main and task.val_set is not None and (cfg.eval_sizes or len(task.cfg.eval_modes) > 1):
        evaluate_run(out, task.cfg, task.val_set, task.results)
    return last


def evaluate_run(run_path: Path, cfg: SegmentConfig, val_set: D.SegmentationFolder, known: dict | None = None):
    """The best weights scored at the run's size and every `eval_sizes` one, in every `eval_modes`
    mode: logged and written to eval.json. `known` holds the validation results computed during
    training by (epoch, "model" | "ema"); the best weights' one is reused rather than recomputed."""
    from swinx.segmentation.inference import load_segmenter
    from swinx.weights.checkpoint import read_metadata

    loaded = load_segmenter(run_path)
    meta = read_metadata(loaded.path)
    done = (known or {}).get((int(meta.get("epoch", -1)), meta.get("weights")))
    reports = []
    for size in dict.fromkeys([cfg.img_size, *cfg.eval_sizes]):
        for mode in cfg.eval_modes:
            settings = cfg.inference(size, mode)
            started = time.perf_counter()
            if size == cfg.img_size and mode == cfg.eval_mode and done is not None:
                result = done
            else:
                result = evaluate_segmenter(loaded.model, val_set, loaded.classes, settings)
            report = eval_report(result, settings)
            report["seconds"] = round(time.perf_counter() - started, 1)
            reports.append(report)
            logger.info(
                f"eval {settings.describe()}: mIoU {report['mIoU']:.2f}  mAcc {report['mAcc']:.2f}  "
                f"aAcc {report['aAcc']:.2f}"
            )
    text = json.dumps({"checkpoint": str(loaded.path), "evaluations": reports}, indent=2)
    atomic_write(run_path / "eval.json", lambda tmp: Path(tmp).write_text(text))
    return reports


def eval_report(result: dict, settings: InferenceSettings) -> dict:
    """One evaluation as `swinx segment eval --json` prints it: mmsegmentation's names, percent."""
    report = {k: result[k] for k in ("mIoU", "mAcc", "aAcc", "per_class")}
    report["img_size"] = None if settings.size is None else f"{settings.size[0]}x{settings.size[1]}"
    report["mode"] = settings.mode
    if settings.mode == "slide":
        report["crop"] = f"{settings.crop[0]}x{settings.crop[1]}"
        report["stride"] = f"{settings.stride[0]}x{settings.stride[1]}"
    if settings.scales != [1.0] or settings.flip:
        report["scales"], report["flip"] = settings.scales, settings.flip
    report["skipped_images"] = result["skipped"]
    return report


def default_out(cfg: SegmentConfig) -> Path:
    name = cfg.name or (f"{Path(cfg.data).resolve().name}-{cfg.model}" if cfg.data else "scenes")
    return Path("runs") / f"segment-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
