"""The run directory: config, metrics, checkpoints, curves and TensorBoard events of one
training run, every file written atomically. Only rank 0 owns one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from swinx.engine.config import TrainError
from swinx.weights.checkpoint import CheckpointError, atomic_write

STATE_FORMAT = 1
logger = logging.getLogger("swinx")


class RunDir:
    """Everything a run writes, all of it atomically."""

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
            raise TrainError(
                f"cannot write to output directory {path}: {e.strerror or e}; pick another with --out DIR"
            ) from e
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
                break  # a line cut short by a kill: everything before it is whole
        return rows

    def write_metrics(self, rows: list[dict]) -> None:
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def plot(self, rows: list[dict], score_key: str) -> None:
        """curves.png: training and validation loss, and the validation metrics named like `score_key`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in rows]
        fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
        first = rows[0] if rows else {}
        if any(r.get("val_loss") is not None for r in rows):
            ax_loss.plot(
                epochs, [float("nan") if r.get("val_loss") is None else r["val_loss"] for r in rows], label="val"
            )
        family = score_key.rstrip("0123456789")  # val_acc1 -> val_acc: top-1 and top-5 together
        for key in [k for k in first if k.startswith(family)]:
            for name in (key, f"ema_{key}"):
                if any(r.get(name) is not None for r in rows):
                    values = [float("nan") if r.get(name) is None else r[name] for r in rows]
                    ax_score.plot(epochs, values, marker=".", label=name.replace("val_", ""))
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_score.set(xlabel="epoch", ylabel=family.replace("val_", ""), title="validation")
        for ax in (ax_loss, ax_score):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        atomic_write(self.file("curves.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)

    def save_epoch(
        self,
        epoch: int,
        rows: list[dict],
        state: dict,
        model: torch.nn.Module,
        best: tuple[torch.nn.Module, str] | None,
        metadata: dict[str, str],
        save_weights: Callable[[torch.nn.Module, Path, dict[str, str]], None],
        score_key: str,
    ) -> None:
        """metrics.jsonl first, then the resume state, then the weights, then `best` = (model, "model"
        or "ema") when it improved. `save_weights(model, path, metadata)` is the task's format.

        Each write is atomic. A kill between two of them leaves files of two adjacent epochs;
        resume reads only last.state.pt (which holds the weights too) and trims the metrics to it.
        """
        self.write_metrics(rows)
        try:
            atomic_write(self.file("last.state.pt"), lambda tmp: torch.save({"format": STATE_FORMAT, **state}, tmp))
            save_weights(model, self.file("last.safetensors"), {**metadata, "weights": "model"})
            if best is not None:
                save_weights(best[0], self.file("best.safetensors"), {**metadata, "weights": best[1]})
        except OSError as e:
            raise TrainError(
                f"could not save the epoch {epoch} checkpoint in {self.path}: {e.strerror or e}; "
                "the previous checkpoint is intact"
            ) from e
        try:
            self.plot(rows, score_key)
        except OSError as e:
            logger.warning(f"warning: could not write {self.file('curves.png')}: {e}")

    def read_state(self) -> dict:
        path = self.file("last.state.pt")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise TrainError(
                f"{path} does not exist: the run has no finished epoch to resume from; start it again without --resume"
            ) from e
        except Exception as e:  # noqa: BLE001 - any decoding failure means the same thing to the user
            raise TrainError(f"cannot read resume state {path}: {e}") from e
        if state.get("format") != STATE_FORMAT:
            raise TrainError(f"{path} was written by another version of swinx")
        return state

    def tensorboard(self):
        """A SummaryWriter into tensorboard/, or None when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.file("tensorboard")))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A file, or a run directory (its best.safetensors, else last.safetensors)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{path} is a directory without best.safetensors or last.safetensors; "
            "give a checkpoint file or a swinx run directory"
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path
