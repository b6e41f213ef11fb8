"""The training loop: one process or many (DDP through torchrun), resumable at every epoch.

`train(TrainConfig(...))` is the whole job; `swinx train` builds the config from a YAML file
and flags (see recipe.py) and the run directory keeps what it produces (see rundir.py). Every
random number generator is reseeded at the start of each epoch from (seed, epoch, rank), so
a run resumed after epoch k replays epochs k+1, ... exactly as the uninterrupted run did.
Messages go to the "swinx" logger; the library itself never prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from . import data as D
from .checkpoint import CheckpointError, load_checkpoint
from .model import SwinTransformer
from .recipe import TrainConfig, TrainError, amp_dtype, mix_transform, param_groups, soft_cross_entropy, warmup_cosine
from .rundir import RunDir, default_out, input_spec
from .variants import create_model

logger = logging.getLogger("swinx")
PROGRESS_SECONDS = 0.5    # how often the progress bar redraws


# ---------------------------------------------------------------------------------------------
# Processes, devices, randomness


@dataclass
class Dist:
    """This process's place in the job; world 1 when not distributed."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun describes: NCCL on GPUs, gloo on CPUs."""
    if not dist.is_initialized():
        use_cuda = device in ("cuda", "auto") and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def pick_device(name: str, ddp: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda asked for, but PyTorch sees no CUDA device; use --device cpu")
        return torch.device("cuda", ddp.rank % torch.cuda.device_count())
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
# Data and model


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


def data_loader(dataset, batch_size: int, sampler, workers: int, drop_last=False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=D.SkippingCollate(), drop_last=drop_last,
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
# Training


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


@dataclass
class Best:
    """The best validation top-1 so far, its epoch and whether the model or its EMA scored it."""

    acc1: float = -1.0
    epoch: int | None = None
    weights: str | None = None


class Trainer:
    """Everything one process trains with: data, model (and EMA, DDP wrapper), optimizer, schedule."""

    def __init__(self, cfg: TrainConfig, ddp: Dist, device: torch.device):
        self.cfg, self.ddp, self.device = cfg, ddp, device
        self.dtype = amp_dtype(cfg.amp, device)
        self.data = build_data(cfg)
        self.num_classes = len(self.data.classes)
        seed_epoch(cfg.seed, 0, 0)      # the same initial weights on every rank
        self.model = build_model(cfg, self.num_classes)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)

        self.sampler = DistributedSampler(self.data.train, num_replicas=ddp.world, rank=ddp.rank, shuffle=True,
                                          seed=cfg.seed)
        self.train_loader = data_loader(self.data.train, cfg.batch_size, self.sampler, cfg.workers,
                                        drop_last=len(self.sampler) >= 2 * cfg.batch_size)
        self.val_loader = None
        if self.data.val is not None:
            shard = D.ShardSampler(len(self.data.val), ddp.rank, ddp.world)
            self.val_loader = data_loader(self.data.val, cfg.batch_size, shard, cfg.workers)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.accum_steps)
        if self.steps_per_epoch == 0:
            raise TrainError(f"the training split has {len(self.data.train)} images, fewer than one batch per "
                             "process; lower --batch-size")

        self.global_batch = cfg.batch_size * cfg.accum_steps * ddp.world
        self.lr_scale = self.global_batch / 512   # the recipe's learning rates are per 512 images
        self.lr = cfg.lr * self.lr_scale
        self.mixer = mix_transform(cfg, self.num_classes)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = None
        self.net = self.model

    def initialise(self, init: str) -> str:
        """Load --init weights (any layout); returns the load report."""
        try:
            return str(load_checkpoint(self.model, init))
        except CheckpointError as e:
            raise TrainError(f"--init {init}: {e}") from e

    def prepare(self) -> None:
        """Move to the device, then build what holds references to the parameters."""
        cfg = self.cfg
        self.model.to(self.device)
        if cfg.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if self.ddp.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=self.lr,
                                           betas=(0.9, 0.999), eps=1e-8)
        scale = self.lr_scale
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
            self.lr, cfg.min_lr * scale, cfg.warmup_lr * scale, round(cfg.warmup_epochs * self.steps_per_epoch),
            cfg.epochs * self.steps_per_epoch))

    def state_dict(self, epoch: int, best: Best) -> dict:
        return {"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "best": vars(best), "small_map": self.model.small_map}

    def load_state_dict(self, state: dict) -> tuple[int, Best]:
        self.model.load_state_dict(state["model"])
        self.model.small_map = state["small_map"]      # --init may have switched it (torchvision weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        return state["epoch"], Best(**state["best"])

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training split; returns the metrics row's training half."""
        cfg, ddp, device = self.cfg, self.ddp, self.device
        self.sampler.set_epoch(epoch)
        self.train_loader.generator = seed_epoch(cfg.seed, epoch, ddp.rank)
        self.net.train()
        progress = Progress(cfg, ddp, len(self.train_loader), epoch, cfg.epochs)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        skipped = torch.zeros((), dtype=torch.int64, device=device)
        first_bad = None
        started = time.perf_counter()
        batches = len(self.train_loader)
        for i, (batch, bad) in enumerate(self.train_loader):
            if bad:
                skipped += len(bad)
                first_bad = first_bad or bad[0]
                if cfg.max_bad_images is not None and int(skipped) > cfg.max_bad_images:
                    raise TrainError(f"more than {cfg.max_bad_images} unreadable images in epoch {epoch}, "
                                     f"e.g. {first_bad.path} ({first_bad.reason})")
            step_now = (i + 1) % cfg.accum_steps == 0 or i + 1 == batches
            if batch is not None:
                loss = self.forward_backward(batch, sync=step_now)
                loss_sum += loss.detach().double() * len(batch[1])
                count += len(batch[1])
            if step_now:
                self.step()
            if batch is not None:
                seconds = time.perf_counter() - started
                progress.update(loss.item(), self.optimizer.param_groups[0]["lr"], int(count) * ddp.world / seconds)
        progress.close()
        seconds = time.perf_counter() - started
        for t in (loss_sum, count, skipped):
            ddp.all_sum(t)
        report_unreadable(cfg, ddp, f"epoch {epoch}: training", int(skipped), first_bad)
        return {"epoch": epoch, "train_loss": float(loss_sum) / max(int(count), 1), "val_loss": None,
                "val_acc1": None, "val_acc5": None, "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_seconds": round(seconds, 3), "images_per_second": round(int(count) / seconds, 1),
                "skipped_images": int(skipped)}

    def forward_backward(self, batch, sync: bool) -> torch.Tensor:
        """Loss of one micro-batch, its gradient accumulated (DDP all-reduces only when `sync`)."""
        cfg, device = self.cfg, self.device
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        targets = labels
        if self.mixer is not None:
            images, targets = self.mixer(images, labels)
        no_sync = self.net.no_sync() if self.ddp.world > 1 and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None):
                logits = self.net(images)
            loss = soft_cross_entropy(logits, targets, cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainError(f"the loss is {loss.item()}; lower --lr, or use --amp bf16 instead of fp16")
            self.scaler.scale(loss / cfg.accum_steps).backward()
        return loss

    def step(self) -> None:
        """Clip, step, schedule (per optimizer step) and update the EMA."""
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validate(self, row: dict) -> None:
        """Add validation metrics (model, and EMA when there is one) to the epoch's row."""
        if self.val_loader is None:
            return
        args = (self.val_loader, self.num_classes, self.device, self.dtype, self.ddp)
        result = evaluate(self.model, *args)
        row.update(val_loss=result["loss"], val_acc1=result["acc1"], val_acc5=result["acc5"])
        row["skipped_images"] += result["skipped"]
        report_unreadable(self.cfg, self.ddp, f"epoch {row['epoch']}: validation", result["skipped"],
                          result["first_unreadable"], row["skipped_images"])
        if self.ema is not None:
            ema = evaluate(self.ema.module, *args)
            row.update(ema_val_loss=ema["loss"], ema_val_acc1=ema["acc1"], ema_val_acc5=ema["acc5"])

    def describe(self) -> str:
        c, cfg = self.model.config, self.cfg
        return (f"training {cfg.model} (V{c.version}, patch {c.patch_size}, embed {c.embed_dim}, depths {c.depths}, "
                f"window {c.window_size}: {sum(p.numel() for p in self.model.parameters()):,} parameters) on "
                f"{len(self.data.train):,} images, {self.num_classes} classes, {self.ddp.world} process(es) on "
                f"{self.device}, global batch {self.global_batch}, lr {self.lr:.2e}")


def train(cfg: TrainConfig, resume: str | Path | None = None, distributed: bool = False) -> dict:
    """Run (or resume) training; returns the last epoch's metrics. Rank 0 writes the run directory.

    `distributed=True` joins the process group that torchrun set up (one process per device).
    """
    ddp = init_distributed(cfg.device) if distributed else Dist()
    device = pick_device(cfg.device, ddp)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    say = logger.info if ddp.main else (lambda *a, **k: None)

    run_path = Path(resume) if resume is not None else Path(cfg.out) if cfg.out else default_out(cfg)
    state = RunDir(run_path).read_state() if resume is not None else None
    run = RunDir.create(run_path) if ddp.main else None

    trainer = Trainer(cfg, ddp, device)
    if cfg.init and state is None:
        say(f"initialised from {cfg.init}:\n{trainer.initialise(cfg.init)}")
    trainer.prepare()
    start_epoch, rows, best = 0, [], Best()
    if state is not None:
        start_epoch, best = trainer.load_state_dict(state)
        if run is not None:
            rows = [r for r in run.metrics() if r["epoch"] <= start_epoch]
            run.write_metrics(rows)
            run.remove_partial_files()
        say(f"resuming {run_path} after epoch {start_epoch}")
    writer = None
    if run is not None:
        import yaml

        run.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        writer = run.tensorboard()
    metadata = {"train_config": json.dumps(cfg.to_dict()), "input": json.dumps(input_spec(cfg))}

    say(f"{trainer.describe()}; writing {run_path}")
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            row = trainer.train_epoch(epoch)
            trainer.validate(row)
            if ddp.world > 1:
                row["ranks_in_sync"] = ranks_in_sync(trainer.model, ddp)
                if not row["ranks_in_sync"]:
                    raise TrainError(f"epoch {epoch}: the {ddp.world} processes hold different weights")
            improved = best_of_epoch(row, best)
            rows.append(row)
            if run is not None:
                best_model = None
                if improved:
                    best_model = (trainer.ema.module if best.weights == "ema" else trainer.model, best.weights)
                run.save_epoch(epoch, rows, trainer.state_dict(epoch, best), trainer.model, best_model,
                               trainer.data.classes, {**metadata, "epoch": str(epoch)})
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                            writer.add_scalar(key, value, epoch)
                    writer.flush()
            say(epoch_line(row, cfg.epochs))
    except KeyboardInterrupt:
        if run is not None:
            logger.warning(f"interrupted in epoch {epoch}; the last finished epoch is saved. Continue with: "
                           f"swinx train --resume {run_path}")
        raise
    finally:
        if writer is not None:
            writer.close()
    last = rows[-1] if rows else {}
    if last:
        say(final_line(last, best, run_path))
    if ddp.world > 1:
        dist.barrier()
    return last


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
        logger.warning(f"warning: {where}: skipped {skipped} unreadable image(s){example}")


def ranks_in_sync(model: torch.nn.Module, ddp: Dist) -> bool:
    """True when every rank holds bitwise the same weights (compared through a float64 checksum)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        checksum = torch.stack([flat.sum(), (flat * torch.arange(1, len(flat) + 1, dtype=torch.float64,
                                                                  device=flat.device).sin()).sum()])
        gathered = [torch.empty_like(checksum) for _ in range(ddp.world)]
        dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def best_of_epoch(row: dict, best: Best) -> bool:
    """Update `best` with the better of the model and its EMA this epoch; True if it improved."""
    candidates = [(row.get(key), name) for key, name in (("val_acc1", "model"), ("ema_val_acc1", "ema"))]
    candidates = [c for c in candidates if c[0] is not None]
    if not candidates:
        return False
    score, weights = max(candidates, key=lambda c: c[0])
    if score <= best.acc1:
        return False
    best.acc1, best.epoch, best.weights = score, row["epoch"], weights
    return True


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def epoch_line(row: dict, epochs: int) -> str:
    line = (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {_fmt(row['val_loss'], '.4f')}"
            f"  top-1 {_fmt(row['val_acc1'], '.2f')}%  top-5 {_fmt(row['val_acc5'], '.2f')}%")
    if row.get("ema_val_acc1") is not None:
        line += f"  EMA top-1 {row['ema_val_acc1']:.2f}%"
    return line + f"  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s ({row['images_per_second']:.0f} img/s)"


def final_line(last: dict, best: Best, run_path: Path) -> str:
    if last.get("val_acc1") is None:
        return f"done: no validation split; checkpoints in {run_path}"
    return (f"done: final val top-1 {last['val_acc1']:.2f}% (best {best.acc1:.2f}% at epoch {best.epoch}, "
            f"{best.weights} weights); checkpoints in {run_path}")
