"""The training recipe: every setting of a run (TrainConfig), the MNIST preset, and the
pieces of the paper's recipe as small functions (optimizer groups, schedule, Mixup/CutMix,
mixed precision)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from swinx.classification import data as D
from swinx.engine.config import (  # noqa: F401 - TrainError, amp_dtype, param_groups, warmup_cosine re-exported
    TrainError,
    amp_dtype,
    check_engine_settings,
    param_groups,
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
    workers: int = 4
    device: str = "auto"
    out: str | None = None  # default runs/<name>-<time>
    name: str | None = None
    progress: str = "auto"  # auto (on a terminal) | on | off
    max_bad_images: int | None = None  # stop when more images than this are unreadable in one epoch

    def __post_init__(self):
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
    base = {} if settings.get("data") else dict(MNIST_PRESET)
    base.update(settings)
    return TrainConfig.from_dict(base)


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
