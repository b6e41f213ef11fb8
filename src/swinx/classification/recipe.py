"""The training recipe: every setting of a run (TrainConfig), the MNIST preset, and the
pieces of the paper's recipe as small functions (optimizer groups, layer-wise lr decay and
freezing for fine-tuning, schedule, Mixup/CutMix, mixed precision)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from swinx.classification import data as D
from swinx.engine.config import (  # noqa: F401 - re-exported for the tasks
    TrainError,
    amp_dtype,
    check_engine_settings,
    default_workers,
    finetune_param_groups,
    freeze,
    param_groups,
    preset_amp,
    read_settings,
    warmup_cosine,
)


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the paper's ImageNet recipe, with the learning rates
    given for a global batch of 512 and scaled linearly to the real one."""

    # data and model
    data: str | None = None  # ImageFolder root (train/, val/); None: built-in MNIST 5k
    model: str = "swin_t"
    model_args: dict = field(default_factory=dict)  # SwinConfig overrides (embed_dim, depths, ...)
    img_size: int = 224
    in_chans: int = 3
    window_size: int | None = None  # None: the variant's
    init: str | None = None  # fine-tune from a checkpoint of any layout
    # optimisation
    epochs: int = 300
    batch_size: int = 128  # per process, per micro-batch
    accum_steps: int = 1
    lr: float = 5e-4  # for a global batch of 512
    min_lr: float = 5e-6
    warmup_lr: float = 5e-7
    warmup_epochs: float = 20
    weight_decay: float = 0.05
    clip_grad: float | None = 5.0
    label_smoothing: float = 0.1
    drop_path: float = 0.2
    ema_decay: float = 0.0  # 0: no EMA
    amp: str = "auto"  # auto (bf16 where supported) | bf16 | fp16 | off
    grad_checkpointing: bool = False
    # fine-tuning
    layer_decay: float = 1.0  # layer-wise lr decay (SimMIM / BEiT): lr x layer_decay ** (L + 1 - layer id); 1: off
    head_lr: float | None = None  # the head's lr for a global batch of 512, scaled like lr; None: lr
    freeze_stages: int = 0  # N >= 1: patch embedding and stages 1..N frozen (no gradient, eval mode)
    linear_probe: bool = False  # train the head only; everything else frozen, in eval mode
    # augmentation
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    auto_augment: str = "randaugment"
    randaug_magnitude: int = 9
    crop_scale: float = 0.08
    hflip: float = 0.5
    reprob: float = 0.25
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple = D.IMAGENET_MEAN
    std: tuple = D.IMAGENET_STD
    # run
    seed: int = 0
    workers: int | None = None  # None: follow the machine (see default_workers)
    device: str = "auto"
    out: str | None = None  # default runs/<name>-<time>
    name: str | None = None
    progress: str = "auto"  # auto (on a terminal) | on | off
    max_bad_images: int | None = None  # stop when more images than this are unreadable in one epoch
    threads: int = 0  # CPU compute threads; 0: follow what other processes leave free (engine/threads.py)

    def __post_init__(self):
        if self.workers is None:
            self.workers = default_workers()
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.in_chans == 1 and len(self.mean) == 3 and len(self.std) == 3:
            # gray input with 3-channel statistics: use their channel means (ImageNet: 0.449 / 0.226)
            self.mean, self.std = (sum(self.mean) / 3,), (sum(self.std) / 3,)
        problems = []
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            problems.append(
                f"mean {list(self.mean)} and std {list(self.std)} need one value per input channel "
                f"(in_chans {self.in_chans})"
            )
        for name in ("img_size", "in_chans"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        problems += check_engine_settings(self)
        if not 0 < self.layer_decay <= 1:
            problems.append(f"layer_decay must be in (0, 1] (1: off, e.g. 0.9 to fine-tune), got {self.layer_decay}")
        if self.head_lr is not None and not self.head_lr > 0:
            problems.append(f"head_lr must be positive (or unset: the same as lr), got {self.head_lr}")
        if self.freeze_stages < 0:
            problems.append(f"freeze_stages must be 0 (nothing frozen) or a number of stages, got {self.freeze_stages}")
        if min(self.std) <= 0:
            problems.append(f"std must be positive, got {list(self.std)}")
        if problems:
            raise TrainError("invalid training settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training setting(s) {unknown}; valid settings: {sorted(known)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


MNIST_PRESET = dict(
    model="swin_t",
    model_args=dict(patch_size=2, embed_dim=32, depths=[2, 2, 2], num_heads=[1, 2, 4]),
    img_size=28,
    in_chans=1,
    window_size=7,
    epochs=40,
    batch_size=64,
    lr=2e-3 * 512 / 64,
    min_lr=1e-5,
    warmup_lr=1e-6,
    warmup_epochs=2,
    drop_path=0.1,
    label_smoothing=0.1,
    mixup=0.0,
    cutmix=0.0,
    auto_augment="none",
    crop_scale=0.7,
    hflip=0.0,
    reprob=0.0,
    crop_pct=1.0,
    ema_decay=0.0,
    mean=D.MNIST_MEAN,
    std=D.MNIST_STD,
    workers=0,
)
"""The built-in default: a 0.57M-parameter Swin trained from scratch on 4,000 MNIST digits."""


def resolve_config(yaml_path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the MNIST preset when no data is given, then a YAML file, then flags."""
    settings = read_settings(yaml_path, overrides)
    base = {} if settings.get("data") else mnist_preset()
    base.update(settings)
    return TrainConfig.from_dict(base)


def mnist_preset() -> dict:
    """MNIST_PRESET, with the presets' precision (`preset_amp`: bf16 autocast on a CPU with native bf16)."""
    return dict(MNIST_PRESET, amp=preset_amp())


# ---------------------------------------------------------------------------------------------
# Pieces of the recipe


def mix_transform(cfg: TrainConfig, num_classes: int):
    """MixUp / CutMix on whole batches (torchvision.transforms.v2), or None."""
    from torchvision.transforms import v2

    choices = []
    if cfg.mixup > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not choices or cfg.mixup_prob <= 0:
        return None
    chosen = v2.RandomChoice(choices)
    return chosen if cfg.mixup_prob >= 1 else v2.RandomApply([chosen], p=cfg.mixup_prob)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


# ---------------------------------------------------------------------------------------------
# Fitting the recipe to a user's small dataset

SMALL_DATA_IMAGES = 20_000  # up to this many training images on a CPU, the paper's recipe would take hours
SMALL_SIDES = (24, 96)  # the preset's input side, from the images' median short side
PRESET_BUDGET = 4000 * 40 * 28 * 28  # the MNIST preset's images x epochs x pixels: about 5 minutes here
RECIPE_KEYS = (
    "model",
    "model_args",
    "img_size",
    "in_chans",
    "window_size",
    "epochs",
    "batch_size",
    "lr",
    "min_lr",
    "warmup_lr",
    "warmup_epochs",
    "drop_path",
    "mixup",
    "cutmix",
    "auto_augment",
    "crop_scale",
    "hflip",
    "reprob",
    "crop_pct",
    "mean",
    "std",
)


@dataclass
class DataSummary:
    """What a glance at a training split tells: size, image sides and colour, from a sample."""

    images: int
    classes: int
    short: int  # median short side of the sampled images
    long: int
    gray: bool  # most sampled images are single-channel
    mean: tuple
    std: tuple


def summarise(paths: list[str], classes: int, sample: int = 256) -> DataSummary:
    """Open up to `sample` images spread over `paths` (decode them at their size) for the preset's choices."""
    import statistics

    import numpy as np
    from PIL import Image

    step = max(1, len(paths) // sample)
    sides, gray, pixels = [], 0, []
    for path in paths[::step][:sample]:
        try:
            with Image.open(path) as im:
                sides.append(im.size)
                gray += im.mode in ("1", "L", "LA", "I", "I;16", "F")
                pixels.append(np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255)
        except (OSError, ValueError):
            continue  # unreadable files are reported when training reads them
    if not sides:
        raise D.DataError(f"none of the {len(paths)} sampled training images could be read")
    values = np.concatenate(pixels)
    is_gray = gray > len(sides) / 2
    mean, std = values.mean(0), values.std(0)
    if is_gray:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    return DataSummary(
        images=len(paths),
        classes=classes,
        short=int(statistics.median(min(s) for s in sides)),
        long=int(statistics.median(max(s) for s in sides)),
        gray=is_gray,
        mean=tuple(round(float(v), 4) for v in mean),
        std=tuple(round(max(float(v), 1e-3), 4) for v in std),
    )


def small_data_preset(summary: DataSummary) -> dict:
    """The MNIST preset's small Swin and recipe, sized to the data: input side near the images' own,
    4x4 windows or more in stage 1, batch 32, epochs for about the MNIST preset's compute (at most 60)."""
    side = int(min(SMALL_SIDES[1], max(SMALL_SIDES[0], int(summary.short / 8 + 0.5) * 8)))
    patch = 2 if side <= 64 else 4
    tokens = side // patch
    fits = [w for w in (8, 7, 6, 5, 4) if tokens % w == 0]
    window = next((w for w in fits if w <= tokens // 4), next((w for w in fits if w <= tokens // 2), 4))
    picked = mnist_preset()
    picked.update(
        img_size=side,
        window_size=window,
        model_args=dict(MNIST_PRESET["model_args"], patch_size=patch),
        in_chans=1 if summary.gray else 3,
        mean=summary.mean,
        std=summary.std,
        batch_size=32,  # few images: more, smaller steps learn faster than the MNIST preset's 64
        epochs=int(max(10, min(60, PRESET_BUDGET // (summary.images * side * side)))),
    )
    picked.pop("workers")
    return picked


def fit_to_data(cfg: TrainConfig, chosen: set[str], summary: DataSummary) -> tuple[TrainConfig, str]:
    """Settings that fit a small dataset on a CPU when the user chose no model or recipe; returns the
    config and a line saying what was picked and why (or why the given recipe stays)."""
    what = (
        f"{summary.images:,} training images of median {summary.short}x{summary.long} px, "
        f"{'gray' if summary.gray else 'colour'}, {summary.classes} classes"
    )
    architecture = sorted({"model", "model_args", "init"} & chosen)
    if architecture or cfg.init:
        given = ", ".join(f"--{k.replace('_', '-')}" for k in architecture) or f"--init {cfg.init}"
        return cfg, f"{what}: the model and recipe are the ones given ({given})"
    if torch.cuda.is_available() or summary.images > SMALL_DATA_IMAGES:
        return cfg, f"{what}: the paper's ImageNet recipe ({cfg.model} at {cfg.img_size} px, {cfg.epochs} epochs)"
    picked = {k: v for k, v in small_data_preset(summary).items() if k not in chosen}
    new = TrainConfig.from_dict({**cfg.to_dict(), **picked})
    args = new.model_args
    why = (
        f"{what}, no GPU: picked the small-data preset, a {args['embed_dim']}-wide Swin (patch {args['patch_size']}, "
        f"depths {args['depths']}, window {new.window_size}) from scratch at {new.img_size} px, {new.in_chans} "
        f"channel(s) with the data's mean/std, {new.epochs} epochs of batch {new.batch_size} (about the MNIST "
        "preset's compute), no flips (add --hflip 0.5 for photos). The ImageNet recipe (swin_t at 224 px for 300 "
        "epochs) would take hours on a CPU; choose --model/--img-size/--epochs/... to override"
        + (f" (kept yours: {', '.join(sorted(chosen & set(RECIPE_KEYS)))})" if chosen & set(RECIPE_KEYS) else "")
    )
    return new, why
