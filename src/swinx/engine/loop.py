"""The training engine every task plugs into: one process or many (DDP through torchrun),
resumable at every epoch.

A task (classification, detection, ...) supplies its data, model, loss, validation metrics and
weight format through the small `Task` interface below; the engine owns everything else: the
run directory, atomic checkpoints and resume state, metrics.jsonl, TensorBoard and curves, the
progress bar, DDP, autocast, EMA, gradient accumulation and clipping, the per-step learning
rate schedule, per-epoch reseeding, and counting unreadable images.

Every random number generator is reseeded at the start of each epoch from (seed, epoch,
rank), so a run resumed after epoch k replays epochs k+1, ... exactly as the uninterrupted
run did. Messages go to the "swinx" logger; the library itself never prints.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from swinx.engine.config import TrainError, amp_dtype
from swinx.engine.data import Unreadable
from swinx.engine.rundir import RunDir
from swinx.engine.threads import ThreadGovernor

logger = logging.getLogger("swinx")
PROGRESS_SECONDS = 0.5  # how often the progress bar redraws
ESTIMATE_AFTER = 10  # batches of the first epoch after which the run time is estimated


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

    def gather(self, values: list) -> list:
        """Concatenate every rank's list (any picklable items), in rank order, on every rank."""
        if self.world == 1:
            return values
        parts: list[list] = [[] for _ in range(self.world)]
        dist.all_gather_object(parts, values)
        return [v for part in parts for v in part]


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


def data_loader(dataset, batch_size: int, sampler, workers: int, collate_fn, drop_last=False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------------------------------
# What a task provides


class Task(Protocol):
    """One kind of training job. `cfg` carries at least the engine's settings (see engine/config.py).

    The engine calls, in order: `build(ddp, device)` (with every RNG seeded identically on all
    ranks, so the initial weights agree), `initialise(source)` for --init, then per epoch
    `train_loader` batches through `loss`, and `validate` for the metrics row. A batch is what
    the task's collate returns: `(batch or None, [Unreadable, ...])`.
    """

    cfg: Any
    model: torch.nn.Module  # the trained module, unwrapped
    train_loader: DataLoader
    score_key: str  # the validation metric that picks best.safetensors (higher is better)

    def build(self, ddp: Dist, device: torch.device) -> None: ...
    def initialise(self, source: str) -> str: ...
    def param_groups(self) -> list[dict]: ...
    def lr_lambda(self, base_lr: float, steps_per_epoch: int) -> Callable[[int], float]: ...
    def base_lr(self, global_batch: int) -> float: ...
    def loss(self, net: torch.nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]: ...
    def validate(self, model: torch.nn.Module, ddp: Dist, device: torch.device, dtype, epoch: int) -> dict: ...
    def save_weights(self, model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...
    def describe(self, engine: Engine) -> str: ...
    # optional: start_epoch(epoch), called after the engine reseeded every RNG for that epoch
    def epoch_line(self, row: dict) -> str: ...
    def final_line(self, last: dict, best: Best, run_path: Path) -> str: ...


# ---------------------------------------------------------------------------------------------
# The engine


class Progress:
    def __init__(self, cfg, ddp: Dist, total: int, epoch: int, epochs: int):
        show = {"on": True, "off": False}.get(cfg.progress, sys.stderr.isatty())
        self.bar = None
        if show and ddp.main:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=f"epoch {epoch}/{epochs}",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
                mininterval=PROGRESS_SECONDS,
            )

    def update(self, loss: float, lr: float, images_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}", refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Best:
    """The best validation score so far, its epoch and whether the model or its EMA scored it.

    (`acc1` is the name classification runs have always saved in their resume state.)
    """

    acc1: float = -1.0
    epoch: int | None = None
    weights: str | None = None


class Engine:
    """One process's training state around a task: EMA, DDP wrapper, AdamW, schedule, grad scaler."""

    def __init__(self, task: Task, ddp: Dist, device: torch.device):
        cfg = task.cfg
        self.task, self.cfg, self.ddp, self.device = task, cfg, ddp, device
        seed_epoch(cfg.seed, 0, 0)  # the same initial weights on every rank
        task.build(ddp, device)
        self.cfg = cfg = task.cfg  # a task may fit its settings to the data it found
        self.dtype = amp_dtype(cfg.amp, device)
        self.model = task.model
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.steps_per_epoch = -(-len(task.train_loader) // cfg.accum_steps)
        if self.steps_per_epoch == 0:
            raise TrainError(
                f"the training split has {len(task.train_loader.dataset)} images, fewer than one batch "
                "per process; lower --batch-size"
            )
        self.global_batch = cfg.batch_size * cfg.accum_steps * ddp.world
        self.lr = task.base_lr(self.global_batch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = None
        self.net = self.model
        self.estimated = False
        # CPU threads follow the machine's load (fixed when --threads N is given)
        self.threads = ThreadGovernor(cfg.threads) if device.type == "cpu" else None

    def prepare(self) -> None:
        """Move to the device, then build what holds references to the parameters."""
        cfg = self.cfg
        self.model.to(self.device)
        if cfg.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if self.ddp.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        # fused: one update op per parameter group and dtype (CPU and CUDA); elsewhere foreach,
        # a few multi-tensor kernels instead of a dozen small ops per parameter.
        kernel = {"fused": True} if self.device.type in ("cpu", "cuda") else {"foreach": True}
        self.optimizer = torch.optim.AdamW(self.task.param_groups(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8, **kernel)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self.task.lr_lambda(self.lr, self.steps_per_epoch)
        )

    def state_dict(self, epoch: int, best: Best) -> dict:
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "best": vars(best),
            **self.task.extra_state(),
        }

    def load_state_dict(self, state: dict) -> tuple[int, Best]:
        self.model.load_state_dict(state["model"])
        self.task.load_extra_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        return state["epoch"], Best(**state["best"])

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training split; returns the metrics row's training half."""
        cfg, ddp, device, loader = self.cfg, self.ddp, self.device, self.task.train_loader
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        loader.generator = seed_epoch(cfg.seed, epoch, ddp.rank)
        if hasattr(self.task, "start_epoch"):
            self.task.start_epoch(epoch)
        self.net.train()
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
                first_bad = first_bad or bad[0]
                if cfg.max_bad_images is not None and int(skipped) > cfg.max_bad_images:
                    raise TrainError(
                        f"more than {cfg.max_bad_images} unreadable images in epoch {epoch}, "
                        f"e.g. {first_bad.path} ({first_bad.reason})"
                    )
            step_now = (i + 1) % cfg.accum_steps == 0 or i + 1 == batches
            if batch is not None:
                loss, n = self.forward_backward(batch, sync=step_now)
                loss_sum += loss.detach().double() * n
                count += n
            if step_now:
                self.step()
            if self.threads is not None:
                self.threads.poll()
            if batch is not None:
                seconds = time.perf_counter() - started
                progress.update(loss.item(), self.optimizer.param_groups[0]["lr"], int(count) * ddp.world / seconds)
            if not self.estimated and i + 1 == min(ESTIMATE_AFTER, batches):
                self.estimated = True
                if ddp.main:
                    logger.info(estimate_line(seconds / (i + 1) * batches, cfg.epochs - epoch + 1))
        progress.close()
        seconds = time.perf_counter() - started
        for t in (loss_sum, count, skipped):
            ddp.all_sum(t)
        report_unreadable(cfg, ddp, f"epoch {epoch}: training", int(skipped), first_bad)
        return {
            "epoch": epoch,
            "train_loss": float(loss_sum) / max(int(count), 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": round(seconds, 3),
            "images_per_second": round(int(count) / seconds, 1),
            "skipped_images": int(skipped),
            "threads": torch.get_num_threads(),  # at the epoch's end (see ThreadGovernor)
        }

    def forward_backward(self, batch, sync: bool) -> tuple[torch.Tensor, int]:
        """Loss of one micro-batch, its gradient accumulated (DDP all-reduces only when `sync`)."""
        no_sync = self.net.no_sync() if self.ddp.world > 1 and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss, n = self.task.loss(self.net, batch, self.device)
            if not torch.isfinite(loss):
                raise TrainError(f"the loss is {loss.item()}; lower --lr, or use --amp bf16 instead of fp16")
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        return loss, n

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
        """Add the task's validation metrics (model, and EMA as `ema_*` when there is one) to the row."""
        result = self.task.validate(self.model, self.ddp, self.device, self.dtype, row["epoch"])
        skipped, first = result.pop("skipped", 0), result.pop("first_unreadable", None)
        row.update(result)
        row["skipped_images"] += skipped
        report_unreadable(
            self.cfg, self.ddp, f"epoch {row['epoch']}: validation", skipped, first, row["skipped_images"]
        )
        if self.ema is not None:
            ema = self.task.validate(self.ema.module, self.ddp, self.device, self.dtype, row["epoch"])
            row.update({f"ema_{k}": v for k, v in ema.items() if k.startswith("val_")})


def run(
    task: Task,
    resume: str | Path | None = None,
    distributed: bool = False,
    default_out: Callable[[], Path] | None = None,
    resume_command: str = "swinx train",
) -> dict:
    """Run (or resume) training; returns the last epoch's metrics. Rank 0 writes the run directory.

    `distributed=True` joins the process group that torchrun set up (one process per device).
    """
    cfg = task.cfg
    ddp = init_distributed(cfg.device) if distributed else Dist()
    device = pick_device(cfg.device, ddp)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    say = logger.info if ddp.main else (lambda *a, **k: None)

    run_path = Path(resume) if resume is not None else Path(cfg.out) if cfg.out else default_out()
    state = RunDir(run_path).read_state() if resume is not None else None
    run_dir = RunDir.create(run_path) if ddp.main else None

    engine = Engine(task, ddp, device)
    cfg = task.cfg
    if cfg.init and state is None:
        say(f"initialised from {cfg.init}:\n{task.initialise(cfg.init)}")
    engine.prepare()
    start_epoch, rows, best = 0, [], Best()
    if state is not None:
        start_epoch, best = engine.load_state_dict(state)
        if run_dir is not None:
            rows = [r for r in run_dir.metrics() if r["epoch"] <= start_epoch]
            run_dir.write_metrics(rows)
            run_dir.remove_partial_files()
        say(f"resuming {run_path} after epoch {start_epoch}")
    writer = None
    if run_dir is not None:
        import yaml

        run_dir.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        writer = run_dir.tensorboard()

    say(f"{task.describe(engine)}; writing {run_path}")
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            epoch_started = time.perf_counter()
            row = engine.train_epoch(epoch)
            engine.validate(row)
            if ddp.world > 1:
                row["ranks_in_sync"] = ranks_in_sync(engine.model, ddp)
                if not row["ranks_in_sync"]:
                    raise TrainError(f"epoch {epoch}: the {ddp.world} processes hold different weights")
            improved = best_of_epoch(row, best, task.score_key)
            rows.append(row)
            if run_dir is not None:
                best_model = None
                if improved:
                    best_model = (engine.ema.module if best.weights == "ema" else engine.model, best.weights)
                run_dir.save_epoch(
                    epoch,
                    rows,
                    engine.state_dict(epoch, best),
                    engine.model,
                    best_model,
                    {"epoch": str(epoch)},
                    task.save_weights,
                    task.score_key,
                )
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                            writer.add_scalar(key, value, epoch)
                    writer.flush()
            say(task.epoch_line(row))
            if epoch == start_epoch + 1 and epoch < cfg.epochs:
                say(remaining_line(time.perf_counter() - epoch_started, cfg.epochs - epoch, epoch))
    except KeyboardInterrupt:
        if run_dir is not None:
            logger.warning(
                f"interrupted in epoch {epoch}; the last finished epoch is saved. Continue with: "
                f"{resume_command} --resume {run_path}"
            )
        raise
    finally:
        if writer is not None:
            writer.close()
        if engine.threads is not None:
            engine.threads.restore()
    last = rows[-1] if rows else {}
    if last:
        say(task.final_line(last, best, run_path))
    if ddp.world > 1:
        dist.barrier()
    return last


def remaining_line(epoch_seconds: float, epochs_left: int, epoch: int) -> str:
    """The run time left, from a whole epoch (training, validation, saving) just measured."""
    total = epoch_seconds * epochs_left
    when = time.strftime("%H:%M", time.localtime(time.time() + total))
    return (
        f"estimated time left: {total / 60:.1f} min ({epoch_seconds:.1f} s per epoch as epoch {epoch} took with "
        f"validation and saving, x {epochs_left} epochs), done about {when}"
    )


def estimate_line(epoch_seconds: float, epochs_left: int) -> str:
    total = epoch_seconds * epochs_left
    when = time.strftime("%H:%M", time.localtime(time.time() + total))
    return (
        f"estimated training time: {total / 60:.1f} min ({epoch_seconds:.0f} s per epoch x {epochs_left} epochs, "
        f"from the first batches; validation adds to it), done about {when}"
    )


def report_unreadable(
    cfg, ddp: Dist, where: str, skipped: int, first: Unreadable | None, epoch_total: int | None = None
) -> None:
    """Warn about skipped images (naming the first one this rank saw); stop when the epoch's total
    (training and validation) passes --max-bad-images."""
    if not skipped:
        return
    example = f", e.g. {first.path} ({first.reason})" if first is not None else ""
    total = skipped if epoch_total is None else epoch_total
    if cfg.max_bad_images is not None and total > cfg.max_bad_images:
        raise TrainError(
            f"{where}: {total} unreadable image(s) this epoch, more than --max-bad-images {cfg.max_bad_images}{example}"
        )
    if ddp.main:
        logger.warning(f"warning: {where}: skipped {skipped} unreadable image(s){example}")


def ranks_in_sync(model: torch.nn.Module, ddp: Dist) -> bool:
    """True when every rank holds bitwise the same weights (compared through a float64 checksum)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        checksum = torch.stack(
            [flat.sum(), (flat * torch.arange(1, len(flat) + 1, dtype=torch.float64, device=flat.device).sin()).sum()]
        )
        gathered = [torch.empty_like(checksum) for _ in range(ddp.world)]
        dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def best_of_epoch(row: dict, best: Best, key: str) -> bool:
    """Update `best` with the better of the model and its EMA this epoch; True if it improved."""
    candidates = [(row.get(k), name) for k, name in ((key, "model"), (f"ema_{key}", "ema"))]
    candidates = [c for c in candidates if c[0] is not None]
    if not candidates:
        return False
    score, weights = max(candidates, key=lambda c: c[0])
    if score <= best.acc1:
        return False
    best.acc1, best.epoch, best.weights = score, row["epoch"], weights
    return True
