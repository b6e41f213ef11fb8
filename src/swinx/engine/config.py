"""What the engine needs from every task's settings, and the recipe pieces all tasks share.

A task's config is its own dataclass (classification's TrainConfig, detection's DetectConfig);
the engine reads these attributes of it:

    init, epochs, batch_size, accum_steps, clip_grad, ema_decay, amp, grad_checkpointing,
    seed, workers, device, out, progress, max_bad_images, threads

and `to_dict()` for config.yaml. `check_engine_settings` validates them for any task.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

AMP_NAMES = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}  # for log lines


class TrainError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


def read_settings(yaml_path: str | None = None, overrides: dict | None = None) -> dict:
    """A YAML file's settings, then the flags that were given (None: not given) on top."""
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
    return settings


def check_engine_settings(cfg) -> list[str]:
    """Problems with the settings the engine reads (empty when they are fine)."""
    problems = []
    for name in ("epochs", "batch_size", "accum_steps"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        problems.append(f"lr must be positive, got {cfg.lr}")
    if cfg.min_lr < 0 or cfg.warmup_lr < 0 or cfg.warmup_epochs < 0 or cfg.workers < 0 or cfg.threads < 0:
        problems.append("min_lr, warmup_lr, warmup_epochs, workers and threads cannot be negative")
    if not 0 <= cfg.ema_decay < 1:
        problems.append(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.progress not in ("auto", "on", "off"):
        problems.append(f"progress must be auto, on or off, got {cfg.progress!r}")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        problems.append(f"amp must be auto, bf16, fp16 or off, got {cfg.amp!r}")
    return problems


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


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def preset_amp() -> str:
    """The built-in presets' precision: bfloat16 autocast on a CPU that computes bf16 natively
    (AMX or AVX512-BF16), else "auto" (bf16 on a GPU that supports it, float32 elsewhere).
    Measured per training step: the MNIST preset 1.64x faster on an Intel Xeon with AMX (118 ->
    72 ms), the detection scenes preset 1.2-1.5x on an AMD EPYC with AVX512-BF16."""
    on_cpu = not torch.cuda.is_available()
    return "bf16" if on_cpu and cpu_has_native_bf16() else "auto"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position-bias tables, cpb MLP and logit scale.

    `model.no_weight_decay()` names the Swin parameters to spare, where the model has it
    (a detector asks its backbone); every 1-D parameter is spared anyway.
    """
    spared = _spared(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if spared(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _spared(model: torch.nn.Module) -> Callable[[str, torch.nn.Parameter], bool]:
    """The no-weight-decay rule of `param_groups`, as a test of (name, parameter)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return lambda name, p: name in skip or p.ndim <= 1 or "cpb_mlp" in name


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """The layer id of a Swin parameter for layer-wise learning-rate decay, 0 .. sum(depths) + 1.

    The rule of SimMIM's fine-tuning (microsoft/SimMIM, optimizer.py, `get_swin_layer` as used
    by `build_finetune_optimizer`), over our (the official) parameter names, with L = sum(depths):
    `patch_embed.*` and `absolute_pos_embed` -> 0; block j of stage i (`layers.i.blocks.j.*`)
    -> 1 + sum(depths[:i]) + j; stage i's patch merging (`layers.i.downsample.*`, at the end of
    the stage) -> sum(depths[:i + 1]), the id of that stage's last block; everything else (the
    final norm, the head, a backbone's output norms) -> L + 1.

    (SimMIM's function sends `absolute_pos_embed` to L + 1 by falling through; its Swin configs
    have no absolute position embedding. Here it sits with the patch embedding at 0, as BEiT and
    SimMIM's ViT rule place `pos_embed`.)
    """
    top = sum(depths) + 1
    parts = name.split(".")
    if parts[0] in ("patch_embed", "absolute_pos_embed"):
        return 0
    if parts[0] == "layers" and len(parts) > 2:
        stage = int(parts[1])
        if parts[2] == "blocks":
            return 1 + sum(depths[:stage]) + int(parts[3])
        return sum(depths[: stage + 1])  # the patch merging after the stage's blocks
    return top


def layer_ids(model: torch.nn.Module, depths: Sequence[int] | None = None) -> dict[str, int]:
    """`swin_layer_id` of every parameter of a Swin (classifier or backbone); depths default to
    `model.config.depths`."""
    depths = model.config.depths if depths is None else depths
    return {name: swin_layer_id(name, depths) for name, _ in model.named_parameters()}


def finetune_param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr: float,
    layer_decay: float = 1.0,
    head_lr: float | None = None,
    head: str = "head.",
    depths: Sequence[int] | None = None,
) -> list[dict]:
    """AdamW groups for fine-tuning a Swin: layer-wise learning-rate decay and a head rate of its own.

    A trainable parameter with layer id k (`swin_layer_id`, 0 .. L + 1 with L = sum(depths))
    gets lr * layer_decay ** (L + 1 - k): the final norm and the head the full rate, each
    block down to the patch embedding one factor of `layer_decay` less (SimMIM's and BEiT's
    fine-tuning rule, `scales[k] = layer_decay ** (L + 1 - k)` in SimMIM's optimizer.py).
    Parameters whose names start with `head` get `head_lr` instead of `lr` when it is given
    (their layer scale is 1). Weight decay follows `param_groups` (norms, biases, position
    tables, cpb MLP and logit scale spared), so there is a group per (layer id, decay or not);
    frozen parameters (requires_grad False) are left out.

    Every group carries its own "lr", which a LambdaLR schedule multiplies alike. Groups go
    from the top layer down, so the first group runs at `lr` itself whenever any does. With
    layer_decay 1 and no head rate this is `param_groups(model, weight_decay)` unchanged.
    """
    if layer_decay == 1 and head_lr is None:
        return param_groups(model, weight_decay)
    depths = model.config.depths if depths is None else depths
    top = sum(depths) + 1
    spared = _spared(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = swin_layer_id(name, depths)
        is_head = head_lr is not None and name.startswith(head)
        no_decay = spared(name, p)
        key = (-layer, is_head, no_decay)
        if key not in groups:
            rate = (head_lr if is_head else lr) * layer_decay ** (top - layer)
            label = f"layer{layer}{'_head' if is_head else ''}_{'no_decay' if no_decay else 'decay'}"
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": rate, "name": label}
        groups[key]["params"].append(p)
    return [groups[key] for key in sorted(groups)]


def freeze(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Freeze the named submodules and parameters of `model`: requires_grad False, and the modules
    in eval mode (no dropout, no stochastic depth) that lasts through later `model.train()` calls,
    the way SwinBackbone keeps its frozen stages. Each frozen module's `train` becomes a no-op
    (bound to the module, so a deep copy such as an EMA model keeps the behaviour);
    `del module.train` undoes that."""
    for name in names:
        try:
            target = model.get_submodule(name)
        except AttributeError:
            model.get_parameter(name).requires_grad_(False)
            continue
        for p in target.parameters():
            p.requires_grad_(False)
        torch.nn.Module.train(target, False)
        target.train = types.MethodType(_stay_in_eval, target)


def _stay_in_eval(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return self


class ChildrenExcept(torch.nn.Module):
    """A view of `module`'s children except `excluded` (e.g. a detector's or segmenter's heads without
    its backbone), for optimizer groups made apart; it shares the parameters, it owns nothing."""

    def __init__(self, module: torch.nn.Module, *excluded: str):
        super().__init__()
        for name, child in module.named_children():
            if name not in excluded:
                self.add_module(name, child)


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


def warmup_step(base_lr: float, warmup_lr: float, warmup_steps: int, milestones: list[int], gamma: float = 0.1):
    """Multiplier of base_lr at optimizer step s: linear warm-up, then x`gamma` at each milestone step
    (the detection recipe's step decay, e.g. at epochs 27 and 33 of 36)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (warmup_lr + (base_lr - warmup_lr) * step / warmup_steps) / base_lr
        return gamma ** sum(step >= m for m in milestones)

    return factor


def warmup_poly(base_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int, power=1.0):
    """Multiplier of base_lr at optimizer step s: linear warm-up from warmup_lr, then polynomial decay
    (base - min) * (1 - progress) ** power + min (mmsegmentation's PolyLR, the segmentation recipe)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            lr = warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        else:
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            lr = min_lr + (base_lr - min_lr) * (1 - progress) ** power
        return lr / base_lr

    return factor


def default_workers() -> int:
    """Data-loading worker processes for this machine: none on 1-2 cores (the main process decodes
    between steps and the model keeps the cores busy), else up to 4 leaving two cores to compute."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(4, cores - 2)


def parse_size(text) -> tuple[int, int]:
    """ "416" -> (416, 416); "608x416" -> (608, 416) as (H, W)."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 32:
        raise ValueError(f"image size {text!r}: expected N or HxW with sides of at least 32, e.g. 416 or 608x416")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])
