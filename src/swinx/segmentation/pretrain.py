"""`--init digits`: a backbone pretrained on the MNIST training digits, the built-in stand-in for the
ImageNet-pretrained backbone the paper's UperNet starts from (nothing can be downloaded here).

The backbone's architecture (patch size, widths, depths, heads, window) is trained as a digit
classifier by `swinx train` (the classification engine, its MNIST recipe) on the 4,000 training
digits of mnist5k at 56x56 for 6 epochs. The last epoch's weights are kept (no checkpoint is
picked by its score on the held-out digits, which the validation scenes are made of), cached in
~/.cache/swinx/digit-backbones/ by architecture, and made once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from swinx.engine.config import TrainError

logger = logging.getLogger("swinx")
PRETRAIN_EPOCHS = 6
PRETRAIN_SIZE = 56
VERSION = 1


def _architecture(model_args: dict, window_size: int | None) -> dict:
    keys = ("patch_size", "embed_dim", "depths", "num_heads", "mlp_ratio", "version")
    arch = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in model_args.items() if k in keys}
    if window_size is not None:
        arch["window_size"] = window_size
    return arch


def cache_path(model: str, model_args: dict, window_size: int | None) -> Path:
    arch = _architecture(model_args, window_size)
    recipe = [model, arch, PRETRAIN_EPOCHS, PRETRAIN_SIZE, VERSION]
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "swinx" / "digit-backbones" / f"{model}-{digest}.safetensors"


def digit_backbone(model: str, model_args: dict, window_size: int | None) -> Path:
    """The cached digit-pretrained classifier of this architecture, trained first if it is not there.

    Under DDP, rank 0 trains it while the others wait."""
    path = cache_path(model, model_args, window_size)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not path.is_file() and (not distributed or torch.distributed.get_rank() == 0):
        _pretrain(model, model_args, window_size, path)
    if distributed:
        torch.distributed.barrier()
    return path


def _pretrain(model: str, model_args: dict, window_size: int | None, path: Path) -> None:
    """`swinx train` in a child process (its own RNG, threads and allocator state; its lines logged)."""
    import subprocess
    import sys

    arch = _architecture(model_args, window_size)
    logger.info(
        f"--init digits: pretraining the backbone ({model} {arch}) as a classifier of the 4,000 MNIST "
        f"training digits at {PRETRAIN_SIZE}x{PRETRAIN_SIZE}, {PRETRAIN_EPOCHS} epochs; once, cached at {path}"
    )
    with tempfile.TemporaryDirectory(prefix="swinx-digit-backbone-") as tmp:
        run = Path(tmp) / "run"
        command = [sys.executable, "-m", "swinx", "train", "--model", model, "--model-args", json.dumps(arch)]
        command += ["--img-size", str(PRETRAIN_SIZE), "--epochs", str(PRETRAIN_EPOCHS), "--progress", "off"]
        command += ["--out", str(run)] + (["--window-size", str(window_size)] if window_size is not None else [])
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
            lines = []
            for line in child.stdout:
                lines.append(line.rstrip())
                logger.info(f"  {lines[-1]}")
        if child.returncode != 0 or not (run / "last.safetensors").is_file():
            raise TrainError(f"pretraining the digit backbone failed: {lines[-1] if lines else child.returncode}")
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.tmp")
        shutil.copyfile(run / "last.safetensors", staged)
        staged.replace(path)
