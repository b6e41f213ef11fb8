"""Object detection and instance segmentation on the shared engine.

`train(DetectConfig(...))` trains a torchvision detector on a Swin pyramid (detection/model.py)
on COCO data (detection/data.py), scored with pycocotools every `val_every` epochs; the engine
(swinx.engine) runs it: resume, DDP, EMA, AMP, the run directory. With no `data`, the digit
scenes (detection/scenes.py) are written as a COCO dataset and trained on through the same path.
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
from torch.utils.data import DistributedSampler

from swinx.detection import data as D
from swinx.detection import scenes
from swinx.detection.model import create_detector, detector_backbone, parse_detector_name
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
    warmup_cosine,
    warmup_step,
)
from swinx.engine.data import DataError
from swinx.engine.loop import Best, Dist, Engine, data_loader, run
from swinx.weights.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_task_model

logger = logging.getLogger("swinx")
REFERENCE_BATCH = 16  # the recipe's learning rate is for 16 images per step (2 per GPU x 8), scaled linearly


@dataclass
class DetectConfig:
    """Every setting of a detection run. Defaults are the Swin paper's COCO recipe (AdamW 1e-4 at
    batch 16, wd 0.05, multi-scale short side 480-800, step decay), sized for GPUs; with no `data`
    the digit-scenes preset replaces them, and `--data` on a small dataset picks fitting ones."""

    # data and model
    data: str | None = None  # COCO root (annotations/instances_{train,val}*.json); None: digit scenes
    detector: str = "maskrcnn"  # fasterrcnn | maskrcnn | retinanet | fcos (torchvision's)
    model: str = "swin_t"  # the backbone variant
    model_args: dict = field(default_factory=dict)  # SwinConfig overrides for the backbone
    window_size: int | None = None
    small_map: str = "clamp"  # clamp | pad | pad_shift (OpenMMLab's detectors)
    fpn_channels: int = 256
    anchor_sizes: list | None = None  # one per pyramid level; None: torchvision's
    box_batch_size: int = 512  # RoIs sampled per image for the box head (R-CNNs)
    representation_size: int = 1024  # the R-CNN box head's MLP width
    mask_channels: int = 256  # the Mask R-CNN mask head's conv width
    init: str | None = None  # backbone from a classification (any layout) or detector checkpoint
    frozen_stages: int = -1
    norm_eval: bool = False
    # sizes
    train_sizes: list = field(default_factory=lambda: list(range(480, 801, 32)))  # short side, one per batch
    max_size: int = 1333
    img_size: str | None = None  # evaluation size: "416", "608x416" (HxW); None: each image's own
    eval_sizes: list = field(default_factory=list)  # extra sizes evaluated after training (recorded in eval.json)
    # optimisation
    epochs: int = 36
    batch_size: int = 2  # per process, per micro-batch
    accum_steps: int = 1
    lr: float = 1e-4  # for a global batch of 16
    min_lr: float = 0.0
    warmup_lr: float = 1e-7
    warmup_epochs: float = 0.25
    schedule: str = "step"  # step (x0.1 at `milestones`) | cosine
    milestones: list = field(default_factory=lambda: [27, 33])
    weight_decay: float = 0.05
    clip_grad: float | None = None
    drop_path: float = 0.2
    ema_decay: float = 0.0
    amp: str = "auto"
    grad_checkpointing: bool = False
    hflip: float = 0.5
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
            parse_detector_name(f"{self.detector}_{self.model}_fpn")
        except KeyError as e:
            problems.append(str(e.args[0]))
        if self.min_lr > self.lr:
            problems.append(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        if self.schedule not in ("step", "cosine"):
            problems.append(f"schedule must be step or cosine, got {self.schedule!r}")
        if not self.train_sizes or min(self.train_sizes) < 32:
            problems.append(f"train_sizes must list short sides of at least 32 px, got {self.train_sizes}")
        elif self.max_size <= max(self.train_sizes):
            problems.append(
                f"max_size {self.max_size} (the longest side allowed) must exceed the largest short "
                f"side in train_sizes, {max(self.train_sizes)}"
            )
        if self.val_every < 1:
            problems.append(f"val_every must be at least 1, got {self.val_every}")
        try:
            for size in [self.img_size, *self.eval_sizes]:
                if size is not None:
                    parse_size(size)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise TrainError("invalid detection settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown detection setting(s) {unknown}; valid settings: {sorted(known)}")
        return cls(**d)


# The built-in default: a 2.8M-parameter detector, Swin (embed 32, depths 2-2-2-2) from scratch
# under FCOS (anchor-free, no RoI heads: the cheapest of the four on a CPU), FPN width 64, on
# 1,500 digit scenes. FCOS's level scales start at 16 px, so that P3 (stride 8) takes every
# digit up to 128 px from its centre out, at the training sizes and at the larger evaluation
# sizes alike; short sides 224-384 per batch. Scored at 416x416, then 608x608 and 600x424.
SCENES_PRESET = dict(
    detector="fcos",
    model="swin_t",
    model_args=dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8]),
    fpn_channels=64,
    anchor_sizes=[16, 32, 64, 128, 256],
    box_batch_size=128,
    representation_size=256,
    mask_channels=64,
    train_sizes=[224, 256, 288, 320, 352, 384],
    max_size=640,
    img_size="416",
    eval_sizes=["608", "600x424"],
    epochs=5,
    batch_size=8,
    lr=2e-3,
    warmup_epochs=0.5,
    schedule="cosine",
    min_lr=1e-5,
    drop_path=0.1,
    hflip=0.0,
    val_every=5,
    clip_grad=10.0,
)


def scenes_preset() -> dict:
    """SCENES_PRESET, with the presets' precision (`preset_amp`: bf16 autocast on a CPU with native
    bf16, validation staying float32; float32 elsewhere)."""
    return dict(SCENES_PRESET, amp=preset_amp())


def resolve_config(yaml_path: str | None = None, overrides: dict | None = None) -> DetectConfig:
    """Defaults, then the digit-scenes preset when no data is given, then a YAML file, then flags.
    (With --data and no model or recipe chosen, `fit_to_data` adapts the settings when training starts.)"""
    settings = read_settings(yaml_path, overrides)
    base = {} if settings.get("data") else scenes_preset()
    base.update(settings)
    return DetectConfig.from_dict(base)


# ---------------------------------------------------------------------------------------------
# Data and model


def scenes_dir() -> Path:
    """Where the default digit scenes are written once and reused (generation is deterministic)."""
    return Path.home() / ".cache" / "swinx" / f"digit-scenes-v{scenes.SCENES_VERSION}"


def dataset_root(cfg: DetectConfig) -> Path:
    return Path(cfg.data) if cfg.data else scenes_dir()


def build_datasets(cfg: DetectConfig, ddp: Dist | None = None) -> tuple[D.CocoDetection, D.CocoDetection | None]:
    if cfg.data is None and (ddp is None or ddp.main):
        scenes.ensure_scenes(scenes_dir())
    if ddp is not None and ddp.world > 1:
        torch.distributed.barrier()  # rank 0 writes the scenes, the others wait for them
    splits = D.find_splits(dataset_root(cfg))
    masks = cfg.detector == "maskrcnn"
    train = D.CocoDetection(*splits["train"], D.train_transforms(cfg.hflip), masks=masks)
    val = None
    if splits.get("val") is not None:
        val = D.CocoDetection(*splits["val"], D.eval_transforms(), masks=masks, categories=train.categories)
    return train, val


def detector_spec(cfg: DetectConfig, num_classes: int) -> dict:
    """The arguments of `create_detector` that rebuild this run's network (saved with the weights)."""
    backbone_args = dict(cfg.model_args, drop_path_rate=cfg.drop_path, small_map=cfg.small_map)
    if cfg.window_size is not None:
        backbone_args["window_size"] = cfg.window_size
    spec = dict(
        name=f"{cfg.detector}_{cfg.model}_fpn",
        num_classes=num_classes + 1,
        fpn_channels=cfg.fpn_channels,
        anchor_sizes=list(cfg.anchor_sizes) if cfg.anchor_sizes else None,
        frozen_stages=cfg.frozen_stages,
        norm_eval=cfg.norm_eval,
        backbone_args=backbone_args,
        detector_args={},
    )
    if cfg.detector in ("fasterrcnn", "maskrcnn"):
        spec["detector_args"].update(
            box_batch_size_per_image=cfg.box_batch_size, representation_size=cfg.representation_size
        )
    if cfg.detector == "maskrcnn":
        spec["detector_args"]["mask_channels"] = cfg.mask_channels
    return spec


def build_detector(spec: dict) -> torch.nn.Module:
    """`create_detector` from a saved spec; the R-CNN head widths become torchvision's head modules."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    spec = json.loads(json.dumps(spec))  # a copy
    args = spec.pop("detector_args")
    channels, num_classes = spec["fpn_channels"], spec["num_classes"]
    if "representation_size" in args:
        size = args.pop("representation_size")
        args["box_head"] = TwoMLPHead(channels * 7 * 7, size)
        args["box_predictor"] = FastRCNNPredictor(size, num_classes)
        spec["num_classes"] = None  # torchvision's rule: the predictor gives it
    if "mask_channels" in args:
        width = args.pop("mask_channels")
        args["mask_head"] = MaskRCNNHeads(channels, [width] * 4, 1)
        args["mask_predictor"] = MaskRCNNPredictor(width, width, num_classes)
    anchors = spec.pop("anchor_sizes")
    return create_detector(**spec, anchor_sizes=tuple(anchors) if anchors else None, **args)


# ---------------------------------------------------------------------------------------------
# Fitting the settings to a user's data


def fit_to_data(cfg: DetectConfig, chosen: set[str], train: D.CocoDetection) -> tuple[DetectConfig, str]:
    """Settings that fit a dataset and this machine when the user chose none (as the scenes preset does).

    Returns the new config and a message saying what was picked and why. Anything the user set
    (`chosen`) is kept.
    """
    sizes = [(im["height"], im["width"]) for im in train.images if im.get("height") and im.get("width")]
    if not sizes:
        return cfg, ""
    short = statistics.median(min(h, w) for h, w in sizes)
    long = statistics.median(max(h, w) for h, w in sizes)
    count, on_gpu = len(train), torch.cuda.is_available()
    if on_gpu or count > 5000 or short > 640:
        return cfg, ""  # a real dataset on real hardware: the paper's recipe
    boxes = [min(a["bbox"][2], a["bbox"][3]) for a in train.coco.anns.values() if not a.get("iscrowd")]
    small_box = statistics.median(boxes) if boxes else short / 6
    side = int(min(320, max(192, round(short / 32) * 32)))
    picked = scenes_preset()
    picked.update(
        train_sizes=[side - 32, side, side + 32],
        max_size=math.ceil((side + 32) * long / short) + 1,
        img_size=None,  # each image at its own size: a user's photos are not all square
        eval_sizes=[],
        hflip=0.5,
    )
    # About the compute of the scenes preset (~10 minutes here): its optimizer steps, scaled by
    # pixels per image (a step costs about its pixel count), in 6 to 60 epochs.
    preset = scenes_preset()
    preset_pixels = statistics.mean(s * s for s in preset["train_sizes"])
    user_pixels = statistics.mean(s * s for s in picked["train_sizes"]) * long / short
    budget_images = scenes.TRAIN_SCENES * preset["epochs"] * preset_pixels / user_pixels
    picked["epochs"] = int(max(6, min(60, budget_images // max(count, 1))))
    picked["val_every"] = max(1, picked["epochs"] // 3)
    values = {k: v for k, v in picked.items() if k not in chosen and k != "data"}
    new = dataclasses.replace(cfg, **values)
    why = (
        f"{count} training images of median {int(short)}x{int(long)} px (short x long side), "
        f"{len(train.class_names)} classes, objects of median side {small_box:.0f} px, no GPU: picked a small "
        f"{new.model} (embed {new.model_args.get('embed_dim', '-')}, depths {new.model_args.get('depths', '-')}"
        f"{', from scratch' if not new.init else ''}) under {new.detector} with FPN width {new.fpn_channels}, "
        f"short sides {new.train_sizes}, {new.epochs} epochs of batch {new.batch_size} (about the compute of "
        "the digit-scenes preset, ~10 min on a 2-core CPU); "
        "choose --model/--epochs/--lr/... to override"
    )
    return new, why


# ---------------------------------------------------------------------------------------------
# The task


class DetectionTask:
    """What detection plugs into the engine (see swinx.engine.loop.Task)."""

    score_key = "val_AP"

    def __init__(self, cfg: DetectConfig, chosen: set[str] | None = None):
        self.cfg, self.chosen = cfg, chosen
        self.results: dict[tuple[int, str], dict] = {}  # validation results by (epoch, model or ema)

    def build(self, ddp: Dist, device: torch.device) -> None:
        try:
            self.train_set, self.val_set = build_datasets(self.cfg, ddp)
        except DataError as e:
            raise TrainError(str(e)) from e
        if self.cfg.data is not None and self.chosen is not None:
            self.cfg, why = fit_to_data(self.cfg, self.chosen, self.train_set)
            if why and ddp.main:
                logger.info(why)
        cfg = self.cfg
        for split in (self.train_set, self.val_set):
            if split is not None:  # fitting may have changed the detector: masks only for Mask R-CNN
                split.with_masks = cfg.detector == "maskrcnn"
        self.classes = self.train_set.class_names
        self.spec = detector_spec(cfg, len(self.classes))
        self.model = build_detector(self.spec)
        if cfg.grad_checkpointing:
            detector_backbone(self.model).set_grad_checkpointing(True)
        self.ddp = ddp
        sampler = DistributedSampler(self.train_set, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg.seed)
        self.collate = D.MultiScaleCollate(tuple(cfg.train_sizes), max_size=cfg.max_size)
        self.train_loader = data_loader(
            self.train_set,
            cfg.batch_size,
            sampler,
            cfg.workers,
            self.collate,
            drop_last=len(sampler) >= 2 * cfg.batch_size,
        )

    def start_epoch(self, epoch: int) -> None:
        """One size sequence per epoch shared by every rank, so that N processes at batch B/N train on
        the sizes one process at batch B does (each rank's own RNG differs by rank)."""
        self.collate.generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)

    def data_fixes(self) -> dict:
        """What cleaning the annotations fixed or dropped, per split (see CocoDetection.stats)."""
        keys = ("clipped_boxes", "dropped_boxes", "unknown_category", "crowd", "negative_images", "box_masks")
        return {
            name: {k: split.stats[k] for k in keys}
            for name, split in (("train", self.train_set), ("val", self.val_set))
            if split
        }

    def initialise(self, init: str) -> str:
        """--init: the backbone from any classification checkpoint, or a whole swinx detector."""
        from swinx.weights.checkpoint import read_metadata

        if str(init).endswith(".safetensors") and read_metadata(init).get("task") == "detection":
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(init))
            return f"whole detector from {init}"
        try:
            return str(load_checkpoint(detector_backbone(self.model), init))
        except CheckpointError as e:
            raise TrainError(f"--init {init}: {e}") from e

    def base_lr(self, global_batch: int) -> float:
        self.lr_scale = global_batch / REFERENCE_BATCH
        return self.cfg.lr * self.lr_scale

    def param_groups(self) -> list[dict]:
        return param_groups(self.model.backbone, self.cfg.weight_decay) + [
            g for g in param_groups(ChildrenExcept(self.model, "backbone"), self.cfg.weight_decay)
        ]

    def lr_lambda(self, base_lr: float, steps_per_epoch: int):
        cfg, scale = self.cfg, self.lr_scale
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        if cfg.schedule == "cosine":
            return warmup_cosine(
                base_lr, cfg.min_lr * scale, cfg.warmup_lr * scale, warmup, cfg.epochs * steps_per_epoch
            )
        return warmup_step(base_lr, cfg.warmup_lr * scale, warmup, [m * steps_per_epoch for m in cfg.milestones])

    def loss(self, net: torch.nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
        losses = net(images, targets)
        return sum(losses.values()), len(images)

    def validate(self, model: torch.nn.Module, ddp: Dist, device: torch.device, dtype, epoch: int) -> dict:
        """COCO AP every `val_every` epochs and at the last one (None in the other rows)."""
        from swinx.detection.inference import evaluate_detector, metrics_row

        cfg = self.cfg
        if self.val_set is None or (epoch % cfg.val_every and epoch != cfg.epochs):
            return {**metrics_row(None, cfg.detector == "maskrcnn"), "data_fixes": self.data_fixes()}
        size = parse_size(cfg.img_size) if cfg.img_size else None
        # float32 whatever the training dtype: bf16 box coordinates are off by a pixel or more at 300 px
        result = evaluate_detector(model, self.val_set, device, size=size, ddp=ddp, batch_size=cfg.batch_size)
        self.results[(epoch, "model" if model is self.model else "ema")] = result
        return {
            **metrics_row(result, cfg.detector == "maskrcnn"),
            "data_fixes": self.data_fixes(),
            "skipped": result["skipped"],
            "first_unreadable": result["first_unreadable"],
        }

    def save_weights(self, model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
        save_detector(
            model,
            path,
            self.spec,
            self.classes,
            {
                "train_config": json.dumps(self.cfg.to_dict()),
                "label_to_cat_id": json.dumps(self.train_set.label_to_cat_id),
                "img_size": json.dumps(self.cfg.img_size),
                **metadata,
            },
        )

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def describe(self, engine: Engine) -> str:
        cfg, backbone = self.cfg, detector_backbone(self.model)
        c = backbone.config
        params = sum(p.numel() for p in self.model.parameters())
        return (
            f"training {cfg.detector} on {cfg.model} (V{c.version}, embed {c.embed_dim}, depths {c.depths}, "
            f"window {c.window_size}, FPN {cfg.fpn_channels}: {params:,} parameters) on {len(self.train_set):,} "
            f"images of {dataset_root(cfg)}, {len(self.classes)} classes, short sides {list(cfg.train_sizes)}, "
            f"{engine.ddp.world} process(es) on {engine.device}, global batch {engine.global_batch}, "
            f"lr {engine.lr:.2e}, {cfg.epochs} epochs, {AMP_NAMES[engine.dtype]}"
        )

    def epoch_line(self, row: dict) -> str:
        line = f"epoch {row['epoch']}/{self.cfg.epochs}  train_loss {row['train_loss']:.4f}"
        if row.get("val_AP") is not None:
            line += f"  box AP {row['val_AP']:.3f}  AP50 {row['val_AP50']:.3f}"
            if row.get("val_mask_AP") is not None:
                line += f"  mask AP {row['val_mask_AP']:.3f}"
        return line + f"  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s ({row['images_per_second']:.1f} img/s)"

    def final_line(self, last: dict, best: Best, run_path: Path) -> str:
        if best.epoch is None:
            return f"done: no validation score; checkpoints in {run_path}"
        return (
            f"done: best box AP {best.acc1:.3f} at epoch {best.epoch} ({best.weights} weights); "
            f"checkpoints in {run_path}"
        )


def save_detector(model: torch.nn.Module, path: Path, spec: dict, classes: list[str], metadata: dict[str, str]) -> None:
    """Our detector format: safetensors weights with the network spec and class names in the metadata, atomic."""
    meta = {"detector": json.dumps(spec), "classes": json.dumps(classes), **metadata}
    save_task_model(model, path, "detection", meta)


def train(
    cfg: DetectConfig, resume: str | Path | None = None, distributed: bool = False, chosen: set[str] | None = None
) -> dict:
    """Run (or resume) detection training; returns the last epoch's metrics (see engine.loop.run).

    `chosen`: the settings the user set; with `data` given, the others may be fitted to the data.
    """
    task = DetectionTask(cfg, chosen if resume is None else None)
    out = Path(resume) if resume is not None else Path(cfg.out) if cfg.out else default_out(cfg)
    last = run(task, resume, distributed, default_out=lambda: out, resume_command="swinx detect train")
    main = not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)
    if main and task.val_set is not None and (task.cfg.img_size or task.cfg.eval_sizes):
        evaluate_run(out, task.cfg, task.val_set, task.results)
    return last


def evaluate_run(run_path: Path, cfg: DetectConfig, val_set: D.CocoDetection, known: dict | None = None) -> list[dict]:
    """The best weights scored at the run's size and every `eval_sizes` one: logged and written to eval.json.

    `known` maps (epoch, "model" | "ema") to a validation result at the run's size already computed
    during training (DetectionTask.results); the best weights' one is reused rather than recomputed.
    """
    from swinx.detection.inference import eval_report, evaluate_detector, load_detector
    from swinx.weights.checkpoint import read_metadata

    loaded = load_detector(run_path)
    meta = read_metadata(loaded.path)
    done = (known or {}).get((int(meta.get("epoch", -1)), meta.get("weights")))
    reports = []
    for size in dict.fromkeys([cfg.img_size, *cfg.eval_sizes]):
        hw = parse_size(size) if size is not None else None
        started = time.perf_counter()
        if size == cfg.img_size and done is not None:
            result = done
        else:
            result = evaluate_detector(loaded.model, val_set, size=hw, batch_size=cfg.batch_size)
        report = eval_report(result, hw)
        report["seconds"] = round(time.perf_counter() - started, 1)
        reports.append(report)
        line = (
            f"eval at {report['img_size'] or 'native size'}: box AP {report['bbox']['AP']:.3f}  "
            f"AP50 {report['bbox']['AP50']:.3f}  AP75 {report['bbox']['AP75']:.3f}"
        )
        if "segm" in report:
            line += f"  mask AP {report['segm']['AP']:.3f}  AP50 {report['segm']['AP50']:.3f}"
        logger.info(line)
    text = json.dumps({"checkpoint": str(loaded.path), "evaluations": reports}, indent=2)
    atomic_write(run_path / "eval.json", lambda tmp: Path(tmp).write_text(text))
    return reports


def default_out(cfg: DetectConfig) -> Path:
    name = cfg.name or (f"{Path(cfg.data).resolve().name}-{cfg.detector}-{cfg.model}" if cfg.data else "scenes")
    return Path("runs") / f"detect-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
