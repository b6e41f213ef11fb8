"""Reading, converting and writing checkpoints: load_checkpoint, export_state_dict, save_model, load_model."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from swinx.model.backbone import SwinBackbone
from swinx.model.config import SwinConfig
from swinx.model.position import resize_bias_table, table_window
from swinx.model.swin import SwinTransformer
from swinx.weights import layouts

IMAGENET_22K_CLASSES = 21841


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did."""

    layout: str
    loaded: int = 0
    ignored_buffers: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    head: str = "loaded"
    small_map: str | None = None
    skipped: list[str] = field(default_factory=list)  # other parts of a detector / segmenter: neck.*, rpn_head.*, ...
    dropped: list[str] = field(default_factory=list)  # checkpoint tensors this model has no place for (a
    #                                                   backbone: head and final norm; output norms it lacks)
    fresh: list[str] = field(default_factory=list)  # our parameters absent from the checkpoint, left as
    #                                                   initialised (a backbone's output norms)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"layout {self.layout}: {self.loaded} tensors loaded", f"head: {self.head}"]
        if self.resized:
            lines.append("resized: " + ", ".join(self.resized))
        if self.ignored_buffers:
            lines.append(f"ignored {len(self.ignored_buffers)} derived buffers (index, mask, coordinates)")
        if self.skipped:
            parts = sorted({k.split(".", 1)[0] for k in self.skipped})
            lines.append(f"skipped {len(self.skipped)} tensors of the source's other parts ({', '.join(parts)})")
        if self.dropped:
            lines.append("dropped (no place in this model): " + _names(self.dropped))
        if self.fresh:
            lines.append("not in the checkpoint, left freshly initialised: " + _names(self.fresh))
        if self.small_map:
            lines.append(f"small_map set to {self.small_map!r} (the source's rule for maps smaller than a window)")
        lines += self.notes
        return "\n".join(lines)


def _names(keys: list[str]) -> str:
    """weight/bias pairs as one module name: norm0, norm1 rather than norm0.weight, norm0.bias, ..."""
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))
    return ", ".join(modules[:8]) + (f" ... ({len(modules)} in all)" if len(modules) > 8 else "")


# ----- reading ----------------------------------------------------------------------------------
def read_state_dict(source) -> tuple[dict[str, torch.Tensor], bool]:
    """A flat {name: tensor} dict from a path or a (possibly wrapped) dict, and whether it was wrapped.

    A path may also be a model directory or a hub id (see swinx.weights.sources).

    Files are read as safetensors or with torch.load(weights_only=True): only tensors and
    plain containers are unpickled, never code.
    """
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).expanduser().is_file():  # a model directory or a hub id (sources.py)
            from swinx.weights.sources import resolve

            return resolve(source).state, False
        source = _read_file(Path(source).expanduser())
    if not isinstance(source, Mapping):
        raise CheckpointError(f"expected a state dict or a checkpoint path, got {type(source).__name__}")
    wrapped = False
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(source.get(wrapper), Mapping):
            source, wrapped = source[wrapper], True
            break
    bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    state = {k.removeprefix("module."): v for k, v in source.items()} if not bad else {}
    if bad or not state:
        raise CheckpointError(
            "not a model state dict: " + (f"entries {bad[:5]} are not tensors" if bad else "it is empty")
        )
    return state, wrapped


def _refused_global(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
    return lines[0] if lines else str(error).splitlines()[0]


def _read_file(path: Path) -> Mapping:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path) or head[:2] == b"\x80\x02" or path.suffix in (".pth", ".pt", ".pth.tar", ".ckpt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):  # garbage, not a refused class
                raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from e
            raise CheckpointError(
                f"{path} holds Python objects besides tensors and was not unpickled, since "
                f"that could run code ({_refused_global(e)}). Re-save just the state dict."
            ) from e
        except Exception as e:
            if zipfile.is_zipfile(path) or path.suffix != ".bin":
                raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is neither a PyTorch checkpoint nor a safetensors file ({e})") from e


# ----- loading into a model ------------------------------------------------------------------------
def load_checkpoint(model: SwinTransformer | SwinBackbone, source, layout: str = "auto") -> LoadReport:
    """Load weights of any known layout into a classifier or a backbone, strictly; returns a report.

    `source`: a path (.pth, .pt, .bin, .safetensors) or a state dict, optionally wrapped as
    {"model": ...} or {"state_dict": ...} (mmengine). `layout`: "auto" or one of
    swinx.weights.layouts.LAYOUTS. Bias tables are resized to the model's window, a head of
    another class count is replaced by the model's own (a 21841-class ImageNet-22k head is
    remapped to ImageNet-1k). A whole detector or segmenter (`backbone.*` beside `neck.*`,
    `roi_head.*`, `decode_head.*`, ...) loads its backbone, the rest skipped. A `SwinBackbone`
    drops a classifier's head and final norm and keeps its output norms `norm{i}` as
    initialised unless the checkpoint has them (OpenMMLab, official detection repo); a
    classifier reads its final norm from a detection backbone's last output norm. Every
    other mismatch (missing, unexpected or misshapen keys) raises CheckpointError naming them.
    """
    state, wrapped = read_state_dict(source)
    state, skipped = layouts.model_parts(state)
    if layout == "auto":
        try:
            layout = layouts.detect_layout(state, wrapped)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    elif layout not in layouts.LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose 'auto' or one of {layouts.LAYOUTS}")
    state = layouts.normalise_prefix(state, layout)
    if layout.startswith("hf"):
        state = layouts.add_hf_prefix(state, model.config)
    report = LoadReport(layout, skipped=skipped)
    if (why := layouts.unsupported(layout, model.config)) is not None:
        raise CheckpointError(f"cannot load a {layout} checkpoint into this model: {why}")
    backbone = isinstance(model, SwinBackbone)
    last = len(model.config.depths) - 1
    if (
        not backbone
        and layout in ("official", "swinx")
        and "norm.weight" not in state
        and f"norm{last}.weight" in state
    ):
        # The official detection repo (and our backbone) names the last stage's norm norm{last}.
        state = {(f"norm.{k.split('.', 1)[1]}" if k.startswith(f"norm{last}.") else k): v for k, v in state.items()}
        report.notes.append(f"final norm read from the backbone's output norm norm{last}")

    ours = model.state_dict()
    converted, used, missing, mismatched = {}, set(), [], []
    for key, target in ours.items():
        pieces = layouts.peer_pieces(layout, key, model.config)
        absent = [p.key for p in pieces if p.key not in state]
        if absent:
            if backbone and layouts.OUTPUT_NORM.fullmatch(key):
                report.fresh.append(key)
            else:
                missing += absent
            continue
        parts = [state[p.key].chunk(p.parts, 0)[p.part] if p.parts > 1 else state[p.key] for p in pieces]
        used.update(p.key for p in pieces)
        tensor = torch.cat(parts) if len(parts) > 1 else layouts.from_peer(parts[0], pieces[0])
        converted[key] = _fit(key, tensor, target, model, report, mismatched)

    # What a classifier's final norm is called in this layout: a backbone has none.
    final_norm = {p.key for k in ("norm.weight", "norm.bias") for p in layouts.peer_pieces(layout, k, model.config)}
    unexpected, head_dropped = [], False
    for key in sorted(state.keys() - used):
        if key.rsplit(".", 1)[-1] in layouts.DERIVED_BUFFERS:
            report.ignored_buffers.append(key)
        elif backbone and _is_head(key):
            head_dropped = True
            report.dropped.append(key)
        elif (backbone and key in final_norm) or layouts.OUTPUT_NORM.fullmatch(key):
            report.dropped.append(key)  # a backbone's final norm, or an output norm this model lacks
        elif not backbone and model.num_classes == 0 and _is_head(key):
            report.head = "source head dropped (the model has no classifier)"
        else:
            unexpected.append(key)
    if backbone:
        report.head = (
            "head dropped (a backbone has no classifier; its final norm too)"
            if head_dropped
            else "none (a backbone has no classifier)"
        )
    if missing and all(_is_head(k) for k in missing):  # a backbone-only checkpoint
        report.head = "kept the model's own: the checkpoint has no classifier"
        missing = []
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(layout, missing, unexpected, mismatched, state, model))

    model.load_state_dict({**ours, **converted}, strict=True)
    for block in model.blocks():
        block.attn._cache.clear()
    if layout == "torchvision" and model.small_map != "pad":
        model.small_map = report.small_map = "pad"
    if layout == "openmmlab" and model.small_map != "pad_shift":
        report.notes.append(
            f"small_map kept {model.small_map!r}: mmdetection (and pad_small_map=True) uses "
            "'pad_shift', mmpretrain's default equals 'clamp' (model.small_map = ... to change)"
        )
    report.loaded = len(converted)
    return report


def _is_head(key: str) -> bool:
    return key.startswith(("head.", "classifier."))


def _fit(
    key: str, tensor: torch.Tensor, target: torch.Tensor, model: SwinTransformer, report: LoadReport, mismatched: list
) -> torch.Tensor:
    """Adapt a source tensor to our parameter's shape where that has a meaning, else record the mismatch."""
    if tensor.shape == target.shape:
        return tensor
    if key.endswith("relative_position_bias_table") and tensor.shape[1] == target.shape[1]:
        try:
            old, new = table_window(tensor.shape[0]), table_window(target.shape[0])
        except ValueError:
            pass
        else:
            report.resized.append(f"{key} window {old} -> {new}")
            return resize_bias_table(tensor, (old, old), (new, new))
    if key.startswith("head.") and tensor.shape[1:] == target.shape[1:]:
        rows = tensor.shape[0]
        if rows == IMAGENET_22K_CLASSES and target.shape[0] == 1000:
            report.head = "ImageNet-22k head remapped to ImageNet-1k"
            return tensor[imagenet_22k_to_1k()]
        report.head = f"replaced: the source has {rows} classes, the model {target.shape[0]}; new head initialised"
        return target
    if key == "patch_embed.proj.weight" and tensor.shape[0] == target.shape[0] and tensor.shape[2:] == target.shape[2:]:
        src, dst = tensor.shape[1], target.shape[1]
        if src == 1:  # gray to colour: a gray image repeated over the channels gives the same embedding
            report.resized.append(f"patch_embed.proj.weight input channels {src} -> {dst} (repeated, / {dst})")
            return tensor.repeat(1, dst, 1, 1) / dst
        if dst == 1:  # colour to gray: a gray image seen as its colour repetition
            report.resized.append(f"patch_embed.proj.weight input channels {src} -> 1 (summed)")
            return tensor.sum(1, keepdim=True)
    if key == "absolute_pos_embed" and tensor.shape[-1] == target.shape[-1]:
        report.resized.append("absolute_pos_embed")
        return _resize_pos_embed(tensor, model.grid_size)
    mismatched.append((key, tuple(tensor.shape), tuple(target.shape)))
    return target


def _resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    side = int(pos.shape[1] ** 0.5)
    if side * side != pos.shape[1]:
        raise CheckpointError(f"absolute_pos_embed with {pos.shape[1]} positions is not a square grid")
    pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pos = torch.nn.functional.interpolate(pos.float(), size=grid, mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


def imagenet_22k_to_1k() -> torch.Tensor:
    """For each ImageNet-1k class, its row in the 21841-class ImageNet-22k head (1000 indices)."""
    text = resources.files("swinx").joinpath("data/map22kto1k.txt").read_text()
    return torch.tensor([int(line) for line in text.split()])


def _describe(c: SwinConfig, backbone: bool = False) -> str:
    return (
        f"V{c.version}, embed_dim {c.embed_dim}, depths {c.depths}, num_heads {c.num_heads}, "
        f"window {c.window_size}, " + ("a backbone" if backbone else f"{c.num_classes} classes")
    )


def _mismatch_message(layout, missing, unexpected, mismatched, state, model) -> str:
    config = model.config

    def listing(items):
        shown = ", ".join(str(i) for i in sorted(items)[:8])
        return shown + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

    lines = [f"the {layout} checkpoint does not fit this model:"]
    if mismatched:
        lines.append("  shapes differ (key, checkpoint, model): " + listing(mismatched))
    if missing:
        lines.append("  missing from the checkpoint: " + listing(missing))
    if unexpected:
        lines.append("  not in the model: " + listing(unexpected))
    try:
        found = f"The checkpoint looks like {_describe(layouts.infer_config(state, layout))}; the model is "
    except (ValueError, KeyError, AttributeError, StopIteration):
        found = "The model is "
    lines.append(
        found + _describe(config, isinstance(model, SwinBackbone)) + ". Build the model "
        "the checkpoint was made for "
        "(swinx.list_models(), swinx.weights.layouts.infer_config), or pass layout= explicitly."
    )
    return "\n".join(lines)


# ----- exporting -----------------------------------------------------------------------------------
BACKBONE_LAYOUTS = ("swinx", "openmmlab")  # the layouts with a place for a backbone's output norms


def export_state_dict(model: SwinTransformer | SwinBackbone, layout: str = "swinx") -> dict[str, torch.Tensor]:
    """`model`'s weights under another layout's names, loadable strictly by that peer's own class.

    "openmmlab" gives the whole mm model's state dict, as mmengine saves it under "state_dict":
    `backbone.<key>` (with the index and V2 coordinate buffers mm persists) and, for a
    classifier, `head.fc.*` (mmpretrain's ImageClassifier with a LinearClsHead, whose backbone
    has one output norm, norm{L-1}: our final norm). mmdetection's Swin keeps exactly the
    `backbone.` keys of such a file. A backbone exports to "swinx" and "openmmlab" only: the
    other layouts have no output norms.
    """
    if layout not in layouts.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {layouts.LAYOUTS}")
    if (why := layouts.unsupported(layout, model.config)) is not None:
        raise ValueError(f"cannot export to the {layout} layout: {why}")
    if isinstance(model, SwinBackbone) and layout not in BACKBONE_LAYOUTS:
        raise ValueError(
            f"cannot export a backbone to the {layout} layout: it has no output norms (norm0..); "
            f"choose one of {BACKBONE_LAYOUTS}"
        )
    out: dict[str, torch.Tensor] = {}
    split: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in model.state_dict().items():
        pieces = layouts.peer_pieces(layout, key, model.config)
        if len(pieces) > 1:  # our fused tensor is several peer tensors
            for piece, chunk in zip(pieces, tensor.chunk(len(pieces))):
                out[piece.key] = chunk.clone()
        elif pieces[0].parts > 1:  # our tensor is a part of one peer tensor
            split.setdefault(pieces[0].key, {})[pieces[0].part] = tensor
        else:
            out[pieces[0].key] = layouts.to_peer(tensor, pieces[0]).clone()
    for key, parts in split.items():
        like = next(iter(parts.values()))
        out[key] = torch.cat([parts.get(i, torch.zeros_like(like)) for i in range(3)])
    out.update(layouts.derived_buffers(layout, model))
    return out


# ----- our own format ---------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode open() would
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_task_model(model: torch.nn.Module, path: str | os.PathLike, task: str, metadata: dict[str, str]) -> None:
    """A task's whole network (a detector, a segmenter) as safetensors, atomically: the weights, and in
    the metadata {"format": "swinx", "task": task} plus what the task needs to rebuild it (`metadata`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "swinx", "task": task, **metadata}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_task_model(path: str | os.PathLike, task: str, hint: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file `save_task_model` wrote for `task`; CheckpointError naming the
    file otherwise. `hint` says where other kinds of checkpoints go (e.g. "for classifiers use swinx eval")."""
    meta = read_metadata(path)
    if meta.get("task") != task:
        found = f"a swinx {meta['task']} checkpoint" if meta.get("task") else "not a swinx task checkpoint"
        raise CheckpointError(f"{path} is {found}, not a {task} one; {hint}")
    try:
        return meta, load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read the weights in {path}: {e}") from e


def save_model(
    model: SwinTransformer | SwinBackbone,
    path: str | os.PathLike,
    class_names: list[str] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write weights as safetensors with the config (and class names) in the metadata, atomically.

    A backbone also records its out_indices, frozen_stages and norm_eval, and `load_model` rebuilds it."""
    class_names = class_names if class_names is not None else getattr(model, "class_names", None)
    classes = getattr(model, "num_classes", 0)
    if class_names is not None and len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names for a model with {classes} classes")
    metadata = {"format": "swinx", "config": json.dumps(model.config.to_dict())}
    if isinstance(model, SwinBackbone):
        metadata["backbone"] = json.dumps(
            {"out_indices": list(model.out_indices), "norm_eval": model.norm_eval, "frozen_stages": model.frozen_stages}
        )
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    metadata.update(extra_metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a safetensors file written by swinx.save_model ({e})") from e


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SwinTransformer | SwinBackbone:
    """Rebuild a model (or backbone) saved by `save_model` without being told its variant; sets `class_names`."""
    if not Path(path).is_file():
        raise CheckpointError(f"model file {path} does not exist")
    metadata = read_metadata(path)
    if metadata.get("format") != "swinx" or "config" not in metadata:
        raise CheckpointError(
            f"{path} has no swinx config in its metadata; build the model with "
            "swinx.create_model(...) and use swinx.load_checkpoint(model, path)"
        )
    config = SwinConfig.from_dict(json.loads(metadata["config"]))
    if "backbone" in metadata:
        model = SwinBackbone(config, **json.loads(metadata["backbone"]))
    else:
        model = SwinTransformer(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
    return model.to(map_location)
