"""Training: the paper's recipe, a run directory that survives being killed, DDP through torchrun.

`train(TrainConfig(...))` is the whole job; `swinx train` builds the config from a YAML file
and flags. Every epoch writes one line of metrics.jsonl and the `last` checkpoint (weights as
safetensors with class names, and a resume state file), both atomically. Randomness is
reseeded at the start of every epoch from (seed, epoch, rank), so a run resumed from epoch k
replays epochs k+1... exactly as the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from . import data as D
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_model
from .model import SwinTransformer
from .variants import create_model

STATE_FORMAT = 1
PROGRESS_SECONDS = 0.5    # how often the progress bar redraws


class TrainError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the paper's ImageNet recipe, with the learning rates
    given for a global batch of 512 and scaled linearly to the real one."""

    # data and model
    data: str | None = None              # ImageFolder root (train/, val/); None: built-in MNIST 5k
    model: str = "swin_t"
    model_args: dict = field(default_factory=dict)   # SwinConfig overrides (embed_dim, depths, ...)
    img_size: int = 224
    in_chans: int = 3
    window_size: int | None = None       # None: the variant's
    init: str | None = None              # fine-tune from a checkpoint of any layout
    # optimisation
    epochs: int = 300
    batch_size: int = 128                # per process, per micro-batch
    accum_steps: int = 1
    lr: float = 5e-4                     # for a global batch of 512
    min_lr: float = 5e-6
    warmup_lr: float = 5e-7
    warmup_epochs: float = 20
    weight_decay: float = 0.05
    clip_grad: float | None = 5.0
    label_smoothing: float = 0.1
    drop_path: float = 0.2
    ema_decay: float = 0.0               # 0: no EMA
    amp: str = "auto"                    # auto (bf16 where supported) | bf16 | fp16 | off
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
    out: str | None = None               # default runs/<name>-<time>
    name: str | None = None
    progress: str = "auto"               # auto (on a terminal) | on | off
    max_bad_images: int | None = None    # stop when more images than this are unreadable in one epoch

    def __post_init__(self):
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.in_chans == 1 and len(self.mean) == 3 and len(self.std) == 3:
            # gray input with 3-channel statistics: use their channel means (ImageNet: 0.449 / 0.226)
            self.mean, self.std = (sum(self.mean) / 3,), (sum(self.std) / 3,)
        problems = []
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            problems.append(f"mean {list(self.mean)} and std {list(self.std)} need one value per input channel "
                            f"(in_chans {self.in_chans})")
        for name in ("epochs", "batch_size", "accum_steps", "img_size", "in_chans"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.min_lr < 0 or self.warmup_lr < 0 or self.warmup_epochs < 0 or self.workers < 0:
            problems.append("min_lr, warmup_lr, warmup_epochs and workers cannot be negative")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if min(self.std) <= 0:
            problems.append(f"std must be positive, got {list(self.std)}")
        if self.progress not in ("auto", "on", "off"):
            problems.append(f"progress must be auto, on or off, got {self.progress!r}")
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
    img_size=28, in_chans=1, window_size=7,
    epochs=40, batch_size=64, lr=2e-3 * 512 / 64, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=2,
    drop_path=0.1, label_smoothing=0.1, mixup=0.0, cutmix=0.0, auto_augment="none",
    crop_scale=0.7, hflip=0.0, reprob=0.0, crop_pct=1.0, ema_decay=0.0,
    mean=D.MNIST_MEAN, std=D.MNIST_STD, workers=0,
)
"""The built-in default: a 0.57M-parameter Swin trained from scratch on 4,000 MNIST digits."""


def resolve_config(yaml_path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the MNIST preset when no data is given, then a YAML file, then flags."""
    settings: dict = {}
    if yaml_path is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text())
        except OSError as e:
            raise TrainError(f"cannot read config file {yaml_path}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise TrainError(f"config file {yaml_path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise TrainError(f"config file {yaml_path} must hold a mapping of settings, got {type(loaded).__name__}")
        settings.update(loaded)
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    base = {} if settings.get("data") else dict(MNIST_PRESET)
    base.update(settings)
    return TrainConfig.from_dict(base)


# ---------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def setup_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, ddp: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda asked for, but PyTorch sees no CUDA device; use --device cpu")
        return torch.device("cuda", ddp.local_rank)
    return torch.device(name)


def seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Reseed every RNG from (seed, epoch, rank); returns the data-order generator (same on all ranks)."""
    value = (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63
    random.seed(value)
    torch.manual_seed(value)
    try:
        import numpy as np

        np.random.seed(value % 2**32)
    except ImportError:
        pass
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


# ---------------------------------------------------------------------------------------------
# Pieces of the recipe


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise TrainError(f"--amp must be auto, bf16, fp16 or off, got {amp!r}")


def param_groups(model: SwinTransformer, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position-bias tables, cpb MLP and logit scale."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip or p.ndim <= 1 or "cpb_mlp" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(base_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int):
    """Multiplier of base_lr at optimizer step s: linear warm-up from warmup_lr, then cosine to min_lr."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            lr = warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        else:
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
        return lr / base_lr
    return factor


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
# Data


@dataclass
class Data:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    classes: list[str]


def build_data(cfg: TrainConfig) -> Data:
    train_tf = D.train_transform(cfg.img_size, cfg.mean, cfg.std, crop_scale=cfg.crop_scale, hflip=cfg.hflip,
                                 auto_augment=cfg.auto_augment, randaug_magnitude=cfg.randaug_magnitude,
                                 reprob=cfg.reprob, interpolation=cfg.interpolation)
    val_tf = D.eval_transform(cfg.img_size, cfg.mean, cfg.std, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    if cfg.data is None:
        train, val, classes = D.mnist5k()
        train.transform, val.transform = train_tf, val_tf
        return Data(train, val, classes)
    train_dir, val_dir, classes = D.folder_splits(cfg.data)
    train = D.ImageFolder(train_dir, classes, cfg.in_chans, train_tf)
    val = D.ImageFolder(val_dir, classes, cfg.in_chans, val_tf) if val_dir is not None else None
    return Data(train, val, classes)


def data_loader(dataset, batch_size: int, sampler, workers: int, generator=None, drop_last=False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=D.SkippingCollate(), drop_last=drop_last, generator=generator,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def build_model(cfg: TrainConfig, num_classes: int) -> SwinTransformer:
    overrides = dict(cfg.model_args)
    overrides.update(num_classes=num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans,
                     drop_path_rate=cfg.drop_path)
    if cfg.window_size is not None:
        overrides["window_size"] = cfg.window_size
    try:
        return create_model(cfg.model, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"cannot build model {cfg.model!r} with {overrides}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Evaluation (shared with `swinx eval`)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             dtype: torch.dtype | None = None, ddp: Dist | None = None) -> dict:
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
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2).view_as(confusion)
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
        "per_class": [100.0 * float(c) / float(n) if n else float("nan")
                      for c, n in zip(correct_per_class, count_per_class)],
        "confusion": confusion.cpu(),
    }


# ---------------------------------------------------------------------------------------------
# The run directory


class RunDir:
    """Everything a run writes, all of it atomically; only rank 0 owns one."""

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def create(path: Path) -> RunDir:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise TrainError(f"cannot write to output directory {path}: {e.strerror or e}; "
                             "pick another with --out DIR") from e
        return RunDir(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.file(name), lambda tmp: Path(tmp).write_text(text))

    def remove_partial_files(self) -> None:
        """Delete temporary files that a killed atomic write left behind (`.<name>.XXXX.tmp`)."""
        for path in self.path.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    def metrics(self) -> list[dict]:
        path = self.file("metrics.jsonl")
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break     # a line cut short by a kill: everything before it is whole
        return rows

    def write_metrics(self, rows: list[dict]) -> None:
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def plot(self, rows: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in rows]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
        if rows and rows[0].get("val_loss") is not None:
            ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val")
            ax_acc.plot(epochs, [r["val_acc1"] for r in rows], label="top-1")
            ax_acc.plot(epochs, [r["val_acc5"] for r in rows], label="top-5")
            if rows[0].get("ema_val_acc1") is not None:
                ax_acc.plot(epochs, [r["ema_val_acc1"] for r in rows], label="EMA top-1")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        atomic_write(self.file("curves.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def default_out(cfg: TrainConfig) -> Path:
    name = cfg.name or (f"{Path(cfg.data).resolve().name}-{cfg.model}" if cfg.data else "mnist")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise TrainError(f"{path} does not exist: the run has no finished epoch to resume from; "
                         "start it again without --resume") from e
    except Exception as e:  # noqa: BLE001 - any decoding failure means the same thing to the user
        raise TrainError(f"cannot read resume state {path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The loop


class Progress:
    def __init__(self, cfg: TrainConfig, ddp: Dist, total: int, epoch: int, epochs: int):
        show = {"on": True, "off": False}.get(cfg.progress, sys.stderr.isatty())
        self.bar = None
        if show and ddp.main:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True,
                            mininterval=PROGRESS_SECONDS)

    def update(self, loss: float, lr: float, images_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}", refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, log=print) -> dict:
    """Run (or resume) training; returns the last epoch's metrics. Rank 0 writes the run directory."""
    ddp = setup_distributed("cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    device = pick_device(cfg.device, ddp)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    say = log if ddp.main else (lambda *a, **k: None)
    dtype = amp_dtype(cfg.amp, device)

    state = None
    if resume is not None:
        run_path = Path(resume)
        state = read_state(run_path / "last.state.pt")
        if state.get("format") != STATE_FORMAT:
            raise TrainError(f"{run_path / 'last.state.pt'} was written by another version of swinx")
    else:
        run_path = Path(cfg.out) if cfg.out else default_out(cfg)
    run = RunDir.create(run_path) if ddp.main else None

    data = build_data(cfg)
    num_classes = len(data.classes)
    seed_epoch(cfg.seed, 0, 0)      # the same initial weights on every rank
    model = build_model(cfg, num_classes)
    if cfg.init and state is None:
        try:
            report = load_checkpoint(model, cfg.init)
        except CheckpointError as e:
            raise TrainError(f"--init {cfg.init}: {e}") from e
        say(f"initialised from {cfg.init}:\n{report}")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = DistributedSampler(data.train, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg.seed)
    drop_last = len(sampler) >= 2 * cfg.batch_size
    train_loader = data_loader(data.train, cfg.batch_size, sampler, cfg.workers, drop_last=drop_last)
    val_loader = None
    if data.val is not None:
        val_loader = data_loader(data.val, cfg.batch_size, D.ShardSampler(len(data.val), ddp.rank, ddp.world),
                                 cfg.workers)

    global_batch = cfg.batch_size * cfg.accum_steps * ddp.world
    scale = global_batch / 512
    base_lr, min_lr, warmup_lr = cfg.lr * scale, cfg.min_lr * scale, cfg.warmup_lr * scale
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)
    if steps_per_epoch == 0:
        raise TrainError(f"the training split has {len(data.train)} images, fewer than one batch per process; "
                         "lower --batch-size")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr, betas=(0.9, 0.999), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        base_lr, min_lr, warmup_lr, round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    mixer = mix_transform(cfg, num_classes)

    start_epoch, rows, best = 0, [], {"acc1": -1.0, "epoch": None, "weights": None}
    if state is not None:
        model.load_state_dict(state["model"])
        model.small_map = state["small_map"]      # --init may have switched it (torchvision weights)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best = state["epoch"], state["best"]
        if run is not None:
            rows = [r for r in run.metrics() if r["epoch"] <= start_epoch]
            run.write_metrics(rows)
            run.remove_partial_files()
        say(f"resuming {run_path} after epoch {start_epoch}")
    if run is not None:
        import yaml

        run.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    writer = tensorboard_writer(run)

    c = model.config
    say(f"training {cfg.model} (V{c.version}, patch {c.patch_size}, embed {c.embed_dim}, depths {c.depths}, "
        f"window {c.window_size}: {sum(p.numel() for p in model.parameters()):,} parameters) on "
        f"{len(data.train):,} images, {num_classes} classes, {ddp.world} process(es) on {device}, "
        f"global batch {global_batch}, lr {base_lr:.2e}; writing {run_path}")
    last = rows[-1] if rows else {}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            generator = seed_epoch(cfg.seed, epoch, ddp.rank)
            sampler.set_epoch(epoch)
            train_loader.generator = generator
            started = time.perf_counter()
            train_loss, seen, skipped = run_epoch(cfg, net, model, ema, train_loader, optimizer, schedule, scaler,
                                                  mixer, device, dtype, ddp, epoch, num_classes)
            seconds = time.perf_counter() - started
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": None, "val_acc1": None, "val_acc5": None,
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": round(seconds, 3),
                   "images_per_second": round(seen / seconds, 1), "skipped_images": skipped}
            if val_loader is not None:
                result = evaluate(model, val_loader, num_classes, device, dtype, ddp)
                row.update(val_loss=result["loss"], val_acc1=result["acc1"], val_acc5=result["acc5"])
                row["skipped_images"] += result["skipped"]
                report_unreadable(cfg, ddp, f"epoch {epoch}: validation", result["skipped"], result["first_unreadable"],
                                  row["skipped_images"])
                if ema is not None:
                    ema_result = evaluate(ema.module, val_loader, num_classes, device, dtype, ddp)
                    row.update(ema_val_loss=ema_result["loss"], ema_val_acc1=ema_result["acc1"],
                               ema_val_acc5=ema_result["acc5"])
            if ddp.world > 1:
                row["ranks_in_sync"] = ranks_in_sync(model, ddp)
                if not row["ranks_in_sync"]:
                    raise TrainError(f"epoch {epoch}: the {ddp.world} processes hold different weights")
            score, weights = best_candidate(row)
            improved = score is not None and score > best["acc1"]
            if improved:
                best = {"acc1": score, "epoch": epoch, "weights": weights}
            rows.append(row)
            last = row
            if run is not None:
                save_epoch(run, cfg, model, ema, optimizer, schedule, scaler, epoch, best, data.classes, rows, improved,
                           weights)
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                            writer.add_scalar(key, value, epoch)
                    writer.flush()
            say(epoch_line(row, cfg.epochs))
    except KeyboardInterrupt:
        if run is not None:
            print(f"\ninterrupted in epoch {epoch}; the last finished epoch is saved. Continue with: "
                  f"swinx train --resume {run_path}", file=sys.stderr)
        raise
    if writer is not None:
        writer.close()
    if last:
        say(final_line(last, best, run_path))
    if ddp.world > 1:
        dist.barrier()
    return last


def run_epoch(cfg, net, model, ema, loader, optimizer, schedule, scaler, mixer, device, dtype, ddp, epoch,
              num_classes):
    net.train()
    progress = Progress(cfg, ddp, len(loader), epoch, cfg.epochs)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = None
    started = time.perf_counter()
    batches = len(loader)
    for i, (batch, bad) in enumerate(loader):
        if bad:
            skipped += len(bad)
            if first_bad is None:
                first_bad = bad[0]
            if cfg.max_bad_images is not None and int(skipped) > cfg.max_bad_images:
                raise TrainError(f"more than {cfg.max_bad_images} unreadable images in epoch {epoch}, "
                                 f"e.g. {first_bad.path} ({first_bad.reason})")
        step_now = (i + 1) % cfg.accum_steps == 0 or i + 1 == batches
        if batch is not None:
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            targets = labels
            if mixer is not None:
                images, targets = mixer(images, labels)
            sync = step_now or ddp.world == 1
            context = net.no_sync() if not sync else _nullcontext()
            with context:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = net(images)
                loss = soft_cross_entropy(logits, targets, cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainError(f"epoch {epoch}, batch {i}: the loss is {loss.item()}; lower --lr, "
                                     "or use --amp bf16 instead of fp16")
                scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach().double() * len(labels)
            count += len(labels)
        if step_now:
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if ema is not None:
                ema.update_parameters(model)
        if batch is not None:
            progress.update(loss.item(), optimizer.param_groups[0]["lr"],
                            int(count) * ddp.world / (time.perf_counter() - started))
    progress.close()
    for t in (loss_sum, count, skipped):
        ddp.all_sum(t)
    report_unreadable(cfg, ddp, f"epoch {epoch}: training", int(skipped), first_bad)
    return float(loss_sum) / max(int(count), 1), int(count), int(skipped)


def report_unreadable(cfg: TrainConfig, ddp: Dist, where: str, skipped: int, first: D.Unreadable | None,
                      epoch_total: int | None = None) -> None:
    """Warn about skipped images (naming the first one this rank saw); stop when the epoch's total
    (training and validation) passes --max-bad-images."""
    if not skipped:
        return
    example = f", e.g. {first.path} ({first.reason})" if first is not None else ""
    total = skipped if epoch_total is None else epoch_total
    if cfg.max_bad_images is not None and total > cfg.max_bad_images:
        raise TrainError(f"{where}: {total} unreadable image(s) this epoch, more than --max-bad-images "
                         f"{cfg.max_bad_images}{example}")
    if ddp.main:
        print(f"warning: {where}: skipped {skipped} unreadable image(s){example}", file=sys.stderr)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def ranks_in_sync(model: torch.nn.Module, ddp: Dist) -> bool:
    """True when every rank holds bitwise the same weights (compared through a float64 checksum)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        checksum = torch.stack([flat.sum(), (flat * torch.arange(1, len(flat) + 1, dtype=torch.float64,
                                                                  device=flat.device).sin()).sum()])
        gathered = [torch.empty_like(checksum) for _ in range(ddp.world)]
        dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def best_candidate(row: dict) -> tuple[float | None, str | None]:
    """The better of the model and its EMA on this epoch's top-1, and which it was."""
    candidates = [(row.get("val_acc1"), "model"), (row.get("ema_val_acc1"), "ema")]
    candidates = [c for c in candidates if c[0] is not None]
    return max(candidates, key=lambda c: c[0]) if candidates else (None, None)


def save_epoch(run: RunDir, cfg, model, ema, optimizer, schedule, scaler, epoch, best, classes, rows, improved,
               weights) -> None:
    """metrics.jsonl first, then the resume state, then the weights: each one atomic.

    A kill between any two writes leaves files from two adjacent epochs; resume reads only
    last.state.pt (which holds the weights too) and trims metrics.jsonl to match it.
    """
    meta = {"epoch": str(epoch), "train_config": json.dumps(cfg.to_dict()), "input": json.dumps(input_spec(cfg))}
    run.write_metrics(rows)
    state = {"format": STATE_FORMAT, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "best": best, "small_map": model.small_map,
             "rng": {"seed": cfg.seed, "reseeded_each_epoch": True}}
    try:
        atomic_write(run.file("last.state.pt"), lambda tmp: torch.save(state, tmp))
        save_model(model, run.file("last.safetensors"), classes, meta)
        if improved:
            source = ema.module if weights == "ema" else model
            save_model(source, run.file("best.safetensors"), classes, {**meta, "weights": weights})
    except OSError as e:
        raise TrainError(f"could not save the epoch {epoch} checkpoint in {run.path}: {e.strerror or e}; "
                         "the previous checkpoint is intact") from e
    try:
        run.plot(rows)
    except OSError as e:
        warnings.warn(f"could not write {run.file('curves.png')}: {e}", stacklevel=1)


def input_spec(cfg: TrainConfig) -> dict:
    """What `swinx predict` and `swinx eval` need to preprocess images like validation did."""
    return {"img_size": cfg.img_size, "channels": cfg.in_chans, "mean": list(cfg.mean), "std": list(cfg.std),
            "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation}


def tensorboard_writer(run: RunDir | None):
    if run is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run.file("tensorboard")))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def epoch_line(row: dict, epochs: int) -> str:
    line = (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {_fmt(row['val_loss'], '.4f')}"
            f"  top-1 {_fmt(row['val_acc1'], '.2f')}%  top-5 {_fmt(row['val_acc5'], '.2f')}%")
    if row.get("ema_val_acc1") is not None:
        line += f"  EMA top-1 {row['ema_val_acc1']:.2f}%"
    return line + f"  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s ({row['images_per_second']:.0f} img/s)"


def final_line(last: dict, best: dict, run_path: Path) -> str:
    if last.get("val_acc1") is None:
        return f"done: no validation split; checkpoints in {run_path}"
    return (f"done: final val top-1 {last['val_acc1']:.2f}% (best {best['acc1']:.2f}% at epoch {best['epoch']}, "
            f"{best['weights']} weights); checkpoints in {run_path}")
