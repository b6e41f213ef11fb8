"""Model directories as transformers and timm write them: config.json (and transformers'
preprocessor_config.json) beside model.safetensors or pytorch_model.bin.

`read_model_dir` turns one into a `Pretrained`: the architecture (from config.json where the
tensor shapes do not say it), the weights, the class names and the preprocessing. The field
tables below are the one place where transformers' and timm's names meet ours; the writers
(`swinx convert --to hf|timm`) use them too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from swinx.model.config import SwinConfig
from swinx.weights import layouts
from swinx.weights.checkpoint import CheckpointError, read_state_dict

# transformers' SwinConfig / Swinv2Config field -> ours. Swinv2Config alone has pretrained_window_sizes.
HF_FIELDS = {
    "image_size": "img_size",
    "patch_size": "patch_size",
    "num_channels": "in_chans",
    "embed_dim": "embed_dim",
    "depths": "depths",
    "num_heads": "num_heads",
    "window_size": "window_size",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "hidden_dropout_prob": "drop_rate",
    "attention_probs_dropout_prob": "attn_drop_rate",
    "drop_path_rate": "drop_path_rate",
    "use_absolute_embeddings": "ape",
    "pretrained_window_sizes": "pretrained_window_sizes",
}
HF_MODEL_TYPES = {"swin": 1, "swinv2": 2}  # config.json "model_type" -> our version
HF_CLASSES = {1: "SwinForImageClassification", 2: "Swinv2ForImageClassification"}
HF_BACKBONES = {1: "SwinModel", 2: "Swinv2Model"}
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # preprocessor_config.json "resample"

# timm's SwinTransformer / SwinTransformerV2 keyword arguments (config.json "model_args") we read.
TIMM_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "mlp_ratio",
    "qkv_bias",
    "drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "pretrained_window_sizes",
    "num_classes",
)
TIMM_IGNORED_ARGS = {"global_pool": "avg"}  # arguments with the only value we build (anything else is refused)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what transformers and timm write, preferred first
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Pretrained:
    """Weights with what came with them: the architecture, class names, preprocessing, where from."""

    config: SwinConfig
    state: dict[str, torch.Tensor]
    layout: str
    class_names: list[str] | None
    preprocessing: dict | None  # an input spec: img_size, channels, mean, std, crop_pct, interpolation
    origin: str  # "transformers", "timm", "file"
    path: Path


# ----- reading -----------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the download may be incomplete") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(value).__name__}")
    return value


def weight_files(directory: Path) -> list[Path]:
    """The weight file(s) of a model directory: one file, or every shard of an index; [] when none."""
    for index in SHARD_INDEXES:
        if (directory / index).is_file():
            shards = sorted(set(read_json(directory / index).get("weight_map", {}).values()))
            return [directory / s for s in shards]
    return [directory / name for name in WEIGHT_FILES if (directory / name).is_file()][:1]


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_model_dir(path: str | Path) -> Pretrained:
    """A transformers or timm model directory (or a hub snapshot of one) as a `Pretrained`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a model directory: it has no config.json (transformers' save_pretrained and "
            f"timm's save_for_hf write one beside {' or '.join(WEIGHT_FILES)})"
        )
    meta = read_json(path / "config.json")
    files = weight_files(path)
    if not files:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise CheckpointError(
            f"{path} has a config.json but no weights: expected {' or '.join(WEIGHT_FILES)} (found: {present})"
        )
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: the shard index names {missing[0].name}, which is not there")
    if "model_type" in meta:
        kind = "transformers"
    elif "architecture" in meta:
        kind = "timm"
    else:
        raise CheckpointError(
            f'{path}/config.json names no architecture: transformers writes "model_type", timm '
            '"architecture"; neither is there'
        )
    architecture = meta.get("model_type") if kind == "transformers" else meta.get("architecture")
    if not _is_swin(kind, architecture):
        raise CheckpointError(
            f"{path}/config.json describes a {architecture!r} model ({kind}), not a Swin Transformer: swinx loads "
            "transformers' model_type 'swin' or 'swinv2' and timm's swin_* / swinv2_* architectures"
        )
    state = {}
    for file in files:
        part, _ = read_state_dict(file)
        state.update(part)
    try:
        layout = layouts.detect_layout(state)
        shapes = layouts.infer_config(state, layout)
    except ValueError as e:
        raise CheckpointError(f"{files[0]}: {e}") from None
    if kind == "transformers":
        config, classes, spec = _from_hf(meta, shapes, path)
    else:
        config, classes, spec = _from_timm(meta, shapes, path)
    return Pretrained(config, state, layout, classes, spec, kind, path)


def _is_swin(kind: str, architecture) -> bool:
    if not isinstance(architecture, str):
        return False
    if kind == "transformers":
        return architecture in HF_MODEL_TYPES
    name = architecture.split(".")[0]
    return name.startswith(("swin_", "swinv2_")) and not name.startswith("swinv2_cr")


def _from_hf(meta: dict, shapes: SwinConfig, path: Path) -> tuple[SwinConfig, list[str] | None, dict | None]:
    version = HF_MODEL_TYPES[meta["model_type"]]
    values = {ours: meta[theirs] for theirs, ours in HF_FIELDS.items() if theirs in meta}
    if version == 1:
        values.pop("pretrained_window_sizes", None)
    config = _config(shapes.replace(version=version, **values), path / "config.json")
    classes = None
    if config.num_classes and isinstance(meta.get("id2label"), dict):
        labels = {int(k): str(v) for k, v in meta["id2label"].items()}
        if sorted(labels) == list(range(config.num_classes)):
            classes = [labels[i] for i in range(config.num_classes)]
    spec = None
    if (path / "preprocessor_config.json").is_file():
        spec = _hf_preprocessing(read_json(path / "preprocessor_config.json"), config)
    return config, classes, spec


def _config(config: SwinConfig, where: Path) -> SwinConfig:
    try:
        return SwinConfig.from_dict(config.to_dict())  # validates the merged fields
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _hf_preprocessing(meta: dict, config: SwinConfig) -> dict:
    size = meta.get("size", config.img_hw[0])
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", config.img_hw[0]))
    crop = meta.get("crop_size")
    if meta.get("do_center_crop") and crop:
        crop = crop.get("height", size) if isinstance(crop, dict) else crop
        crop_pct = crop / size if size else 1.0
        size = crop
    else:
        crop_pct = meta.get("crop_pct") or 1.0  # ViTImageProcessor resizes straight to the size
    return {
        "img_size": int(size),
        "channels": config.in_chans,
        "mean": list(meta.get("image_mean", (0.485, 0.456, 0.406))),
        "std": list(meta.get("image_std", (0.229, 0.224, 0.225))),
        "crop_pct": float(crop_pct),
        "interpolation": PIL_RESAMPLE.get(meta.get("resample", 3), "bicubic"),
    }


def _from_timm(meta: dict, shapes: SwinConfig, path: Path) -> tuple[SwinConfig, list[str] | None, dict | None]:
    from swinx.model.variants import ALIASES, get_config

    arch = meta["architecture"].split(".")[0]
    config = get_config(arch) if arch in ALIASES else shapes
    args = dict(meta.get("model_args") or {})
    for name, value in TIMM_IGNORED_ARGS.items():
        if args.pop(name, value) != value:
            raise CheckpointError(f"{path}/config.json: timm model_args {name}={args[name]!r} is not supported")
    unknown = sorted(set(args) - set(TIMM_ARGS))
    if unknown:
        raise CheckpointError(f"{path}/config.json: timm model_args {unknown} are not supported by swinx")
    if isinstance(args.get("img_size"), list):
        args["img_size"] = tuple(args["img_size"])
    if isinstance(args.get("window_size"), (list, tuple)):
        if len(set(args["window_size"])) != 1:
            raise CheckpointError(f"{path}/config.json: rectangular windows {args['window_size']} are not supported")
        args["window_size"] = args["window_size"][0]
    # What the shapes say wins over the name (a timm name with other depths); the rest from the name.
    said = {k: getattr(shapes, k) for k in ("patch_size", "in_chans", "embed_dim", "depths", "num_heads", "mlp_ratio")}
    if shapes.version == 1:
        said["window_size"] = shapes.window_size
    config = config.replace(**said, version=shapes.version, num_classes=shapes.num_classes)
    config = _config(config.replace(**args), path / "config.json")
    cfg = meta.get("pretrained_cfg") or {}
    names = meta.get("label_names", cfg.get("label_names"))
    classes = [str(n) for n in names] if isinstance(names, list) and len(names) == config.num_classes else None
    spec = None
    if cfg:
        size = cfg.get("test_input_size") or cfg.get("input_size") or (config.in_chans, *config.img_hw)
        spec = {
            "img_size": int(size[1]),
            "channels": config.in_chans,
            "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
            "crop_pct": float(cfg.get("test_crop_pct") or cfg.get("crop_pct") or 0.875),
            "interpolation": cfg.get("interpolation", "bicubic"),
        }
    return config, classes, spec
