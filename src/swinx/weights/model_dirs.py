"""Writing model directories that transformers and timm load with their own loaders.

`write_hf_dir` writes what `transformers.AutoModelForImageClassification.from_pretrained(out)`
and `AutoImageProcessor.from_pretrained(out)` read; `write_timm_dir` what
`timm.create_model("local-dir:" + out, pretrained=True)` reads. Both are read back by
`swinx.weights.directories.read_model_dir`, whose field tables they use.

Every file goes into a fresh directory beside `out`, which is then renamed into place: a
reader sees the old directory or the new one, never half of one. An existing `out` is
replaced only when it is an empty directory or one these writers made (nothing but
config.json, model.safetensors and preprocessor_config.json, and config.json says
"converted_by": "swinx ..."); anything else is refused unless `overwrite=True`, and is then
moved aside and deleted only once the new directory is in place.

Maps smaller than a window: transformers and timm shrink the window to the map and drop the
shift ("clamp"). A model whose own rule (`small_map`, or where transformers' V2 fixes its
windows from config.image_size with floor division) computes a different window or shift
at its training size is refused, since the peer would give other outputs on the very
images the model was made for; set `model.small_map = "clamp"` first to accept the peer's
rule. One that agrees there but uses "pad" / "pad_shift" is written with a warning: the
peer clamps on inputs whose maps get smaller than a window (timm runs at the training size
only, so no warning there). The directory records no small_map: it reads back as "clamp".
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from swinx.model.config import SwinConfig
from swinx.model.windows import window_geometry
from swinx.weights import layouts
from swinx.weights.checkpoint import atomic_write, export_state_dict
from swinx.weights.directories import (
    HF_BACKBONES,
    HF_CLASSES,
    HF_FIELDS,
    HF_MODEL_TYPES,
    PIL_RESAMPLE,
    TIMM_ARGS,
    TIMM_IGNORED_ARGS,
    read_json,
)

logger = logging.getLogger("swinx")

CONFIG, WEIGHTS, PREPROCESSOR = "config.json", "model.safetensors", "preprocessor_config.json"
OUR_FILES = (CONFIG, WEIGHTS, PREPROCESSOR)
MARKER = "converted_by"  # config.json key naming the writer: how a previous directory of ours is recognised
# Outputs with these suffixes are single files (`swinx convert`); other names, with --to hf or timm, directories.
FILE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".tar")
# transformers' V1 as saved by its own save_pretrained (v4 and v5 alike; v5 renames on load): the hub's names.
HF_KEYS = "hf-hub"
TIMM_FIRST_CONV, TIMM_CLASSIFIER = "patch_embed.proj", "head.fc"
# The SwinConfig fields that decide the architecture: those compared when picking a timm name.
_ARCH_FIELDS = (
    "patch_size",
    "in_chans",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "mlp_ratio",
    "qkv_bias",
    "img_size",
    "pretrained_window_sizes",
)


# ----- transformers ------------------------------------------------------------------------------
def write_hf_dir(
    model, out_dir, class_names: list[str] | None = None, preprocessing: dict | None = None, *, overwrite: bool = False
) -> Path:
    """A transformers model directory: config.json, model.safetensors, preprocessor_config.json.

    `class_names` (default: `model.class_names`, else "class i") become id2label / label2id;
    `preprocessing` is an input spec (img_size, channels, mean, std, crop_pct, interpolation;
    default: `swinx.classification.inference.default_input_spec`). The weights carry the
    hub's key names ("hf-hub"), which transformers' own save_pretrained writes and every
    transformers version loads. A classifier is a Swin(v2)ForImageClassification, a
    headless model (num_classes 0) a Swin(v2)Model. See `hf_preprocessor_config` for what the
    image processor can and cannot express. Raises ValueError for a model transformers cannot
    hold, FileExistsError for an `out_dir` that may not be replaced (see the module doc).

    transformers' own V1 (5.x) fails on inputs whose maps get smaller than the window, and a
    block that has once run a map of at most one window stays unshifted for every later input;
    a model that would meet the first at its training size is refused.
    """
    _check_target(Path(out_dir), overwrite)
    _refuse(model, "hf")
    names = _class_names(model, class_names)
    spec = _input_spec(model.config, preprocessing)
    _check_geometry(model, "transformers")
    files = {
        CONFIG: _json_writer(hf_config(model, names)),
        WEIGHTS: _weights_writer(export_state_dict(model, HF_KEYS)),
        PREPROCESSOR: _json_writer(hf_preprocessor_config(spec, model.config)),
    }
    return _write_dir(Path(out_dir), files, overwrite)


def hf_config(model, class_names: list[str] | None) -> dict:
    """transformers' SwinConfig / Swinv2Config of `model`, as its config.json."""
    c = model.config
    meta = {
        "model_type": next(t for t, v in HF_MODEL_TYPES.items() if v == c.version),
        "architectures": [HF_CLASSES[c.version] if c.num_classes else HF_BACKBONES[c.version]],
    }
    for theirs, ours in HF_FIELDS.items():
        if ours == "pretrained_window_sizes" and c.version == 1:
            continue  # SwinConfig has no such field
        meta[theirs] = _json_value(c, ours)
    meta.update(
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        encoder_stride=c.patch_size * 2 ** (len(c.depths) - 1),  # SwinForMaskedImageModeling's upsampling
        num_layers=len(c.depths),
        hidden_size=c.num_features,
        dtype=_dtype(model),
    )
    if c.num_classes:
        names = class_names or [f"class {i}" for i in range(c.num_classes)]
        meta["id2label"] = {str(i): name for i, name in enumerate(names)}
        meta["label2id"] = {name: i for i, name in enumerate(names)}
    meta[MARKER] = _marker()
    return meta


def hf_preprocessor_config(spec: dict, config: SwinConfig) -> dict:
    """An image processor doing what our validation transform does, as preprocessor_config.json.

    Ours (`classification.data.eval_transform`) resizes the shorter side to
    round(img_size / crop_pct), centre-crops img_size x img_size, rescales to [0, 1] and
    normalises. The microsoft/swin-* repos name ViTImageProcessor, which only resizes to a
    fixed (height, width), stretching the image, and has no crop: it cannot express crop_pct.
    BitImageProcessor (CLIP's and BiT's) has exactly our steps: size {"shortest_edge"},
    crop_size, do_center_crop. What it does not keep is crop_pct itself, only the two sizes:
    read back, crop_pct is img_size / round(img_size / crop_pct), which gives the same
    transform, but for one detail: where the margin round(img_size / crop_pct) - img_size is odd,
    transformers crops one pixel nearer the top left (it floors half the margin, torchvision
    rounds it). A model of other than 3 channels gets do_convert_rgb false; transformers'
    processors otherwise assume RGB images.
    """
    interpolation = spec["interpolation"]
    resample = {name: code for code, name in PIL_RESAMPLE.items()}.get(interpolation)
    if resample is None:
        raise ValueError(
            f"interpolation {interpolation!r} has no PIL resample code transformers' image processors and "
            f"swinx read back; choose one of {sorted(PIL_RESAMPLE.values())}"
        )
    size = spec["img_size"]
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(round(size / spec["crop_pct"]))},
        "resample": resample,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec["mean"]),
        "image_std": list(spec["std"]),
        "do_convert_rgb": config.in_chans == 3,
    }


# ----- timm ----------------------------------------------------------------------------------------
def write_timm_dir(
    model, out_dir, class_names: list[str] | None = None, preprocessing: dict | None = None, *, overwrite: bool = False
) -> Path:
    """A timm model directory: config.json and model.safetensors (timm's key names).

    Loads as `timm.create_model("local-dir:" + out, pretrained=True)`, and as
    `timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=out/"model.safetensors",
    num_classes=N), **model_args)` with config.json's "architecture" and "model_args". The
    overlay needs num_classes whenever N differs from the named architecture's (1000 or 21841):
    timm otherwise drops the head as belonging to another class count; for a model of other
    than 3 channels it needs input_size too. `class_names` (default: `model.class_names`)
    become "label_names"; `preprocessing` (see `write_hf_dir`) the "pretrained_cfg". timm's V2
    does not keep its coordinate tables, so the window is in the name or in model_args.
    """
    _check_target(Path(out_dir), overwrite)
    _refuse(model, "timm")
    names = _class_names(model, class_names)
    spec = _input_spec(model.config, preprocessing)
    _check_geometry(model, "timm")
    files = {
        CONFIG: _json_writer(timm_config(model, names, spec)),
        WEIGHTS: _weights_writer(export_state_dict(model, "timm")),
    }
    return _write_dir(Path(out_dir), files, overwrite)


def timm_config(model, class_names: list[str] | None, spec: dict) -> dict:
    """timm's config.json for `model`: the closest timm name and the arguments that differ from it."""
    from swinx.model.variants import get_config

    c = model.config
    arch = timm_architecture(c)
    base = get_config(arch)
    args = {}
    for name in TIMM_ARGS:
        if name == "pretrained_window_sizes" and c.version == 1:
            continue  # timm's V1 takes no such argument
        if name in ("in_chans", "num_classes") or not _same(base, c, name):
            args[name] = _json_value(c, name)
    meta = {
        "architecture": arch,
        "num_classes": c.num_classes,
        "num_features": c.num_features,
        **TIMM_IGNORED_ARGS,  # global_pool "avg"
        "model_args": args,
    }
    if class_names is not None:
        meta["label_names"] = list(class_names)
    meta["pretrained_cfg"] = {
        "input_size": [c.in_chans, spec["img_size"], spec["img_size"]],
        "fixed_input_size": True,
        "interpolation": spec["interpolation"],
        "crop_pct": spec["crop_pct"],
        "crop_mode": "center",
        "mean": list(spec["mean"]),
        "std": list(spec["std"]),
        "num_classes": c.num_classes,
        "first_conv": TIMM_FIRST_CONV,
        "classifier": TIMM_CLASSIFIER,
    }
    meta[MARKER] = _marker()
    return meta


_TIMM_NAME = {
    1: re.compile(r"swin_(tiny|small|base|large)_patch4_window\d+_\d+"),
    2: re.compile(r"swinv2_(tiny|small|base|large)_window\d+(to\d+)?_\d+(to\d+)?"),
}


def timm_names(version: int) -> list[str]:
    """The names in our alias table that timm registers too (the official ones differ: `_22k`, `patch4` in V2)."""
    from swinx.model.variants import ALIASES

    return [name for name in ALIASES if _TIMM_NAME[version].fullmatch(name)]


def timm_architecture(config: SwinConfig) -> str:
    """The timm name whose configuration differs from `config` in the fewest architecture fields."""
    from swinx.model.variants import get_config

    def distance(name: str) -> int:
        return sum(not _same(get_config(name), config, f) for f in _ARCH_FIELDS)

    return min(timm_names(config.version), key=distance)


def _same(a: SwinConfig, b: SwinConfig, name: str) -> bool:
    if name == "img_size":
        return a.img_hw == b.img_hw
    if name == "pretrained_window_sizes":  # per stage; all zeros whatever the stage count
        pa, pb = a.pretrained_window_sizes, b.pretrained_window_sizes
        return pa == pb or not (any(pa) or any(pb))
    return getattr(a, name) == getattr(b, name)


# ----- the command's side --------------------------------------------------------------------------
WRITERS = {"hf": write_hf_dir, "timm": write_timm_dir}


def is_directory_output(path: str | os.PathLike) -> bool:
    """Whether `swinx convert ... --to hf|timm` writes `path` as a model directory: an existing
    directory, or a name without a single-file suffix (FILE_SUFFIXES)."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() not in FILE_SUFFIXES


def write_model_dir(model, out_dir, to: str, class_names=None, preprocessing=None, *, overwrite=False) -> Path:
    """`write_hf_dir` (to="hf") or `write_timm_dir` (to="timm")."""
    if to not in WRITERS:
        raise ValueError(f"no model directory for the {to!r} layout; choose one of {sorted(WRITERS)}")
    return WRITERS[to](model, out_dir, class_names, preprocessing, overwrite=overwrite)


# ----- checks --------------------------------------------------------------------------------------
def _refuse(model, layout: str) -> None:
    from swinx.model.backbone import SwinBackbone

    peer = "transformers" if layout == "hf" else "timm"
    if isinstance(model, SwinBackbone):
        raise ValueError(
            f"cannot write a {peer} model directory from a SwinBackbone: it has no place for the output norms "
            "(norm0..); convert a classifier, or a model with num_classes=0"
        )
    if (why := layouts.unsupported(layout, model.config)) is not None:
        raise ValueError(f"cannot write a {peer} model directory: {why}")
    if not model.config.patch_norm:
        raise ValueError(f"cannot write a {peer} model directory: {peer}'s Swin always normalises the patch embedding")


def _class_names(model, class_names) -> list[str] | None:
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    classes = model.config.num_classes
    if names is not None and len(names) != classes:
        raise ValueError(f"{len(names)} class names for a model with {classes} classes")
    return [str(n) for n in names] if names is not None and classes else None


def _input_spec(config: SwinConfig, preprocessing: dict | None) -> dict:
    from swinx.classification.inference import default_input_spec

    spec = {**default_input_spec(config), **(preprocessing or {})}
    problems = []
    if not isinstance(spec["img_size"], int) or spec["img_size"] < 1:
        problems.append(f"img_size must be a positive int, got {spec['img_size']!r}")
    if not 0 < spec["crop_pct"] <= 1:
        problems.append(f"crop_pct must be in (0, 1], got {spec['crop_pct']!r}")
    for key in ("mean", "std"):
        if len(spec[key]) != config.in_chans:
            problems.append(f"{key} has {len(spec[key])} values for a {config.in_chans}-channel model")
    if problems:
        raise ValueError("invalid preprocessing: " + "; ".join(problems))
    return {**spec, "channels": config.in_chans}


def _check_geometry(model, peer: str) -> None:
    """Refuse a model whose windows the peer would compute otherwise at the training size; warn where
    only other sizes differ (see the module doc)."""
    c = model.config
    grid = [-(-s // c.patch_size) for s in c.img_hw]  # ours pads the image to whole patches
    if peer == "timm" and any(s % c.patch_size for s in c.img_hw):
        raise ValueError(
            f"cannot write a timm model directory: img_size {c.img_size} is not a multiple of the patch size "
            f"{c.patch_size}, and timm's patch embedding drops the remainder where this model pads it"
        )
    # The maps each block's windows are fixed for: transformers' V2 from the image size with floor division
    # when it is built, its V1 at run time from the real maps; timm from the image size, halving with ceil.
    floor = peer == "transformers" and c.version == 2
    for i, stage in enumerate(model.layers):
        ours = tuple(-(-g // 2**i) for g in grid)
        theirs = tuple(s // c.patch_size // 2**i for s in c.img_hw) if floor else ours
        if peer == "transformers" and c.version == 1 and min(ours) < c.window_size:
            raise ValueError(
                f"cannot write a transformers model directory: at the training size {c.img_size}, stage {i + 1} has "
                f"a {'x'.join(map(str, ours))} map, smaller than the window {c.window_size}, and transformers' Swin "
                "fails there (it shrinks the window but keeps the bias table of the full one)"
            )
        for block in stage.blocks:
            M, shift = block.window_size, block.shift_size
            mine = window_geometry(*ours, M, shift, c.small_map)
            if peer == "transformers" and c.version == 1:
                other = window_geometry(*ours, M, shift, "clamp")
                other = (other.window, other.shift)
            else:  # clamped along each axis separately
                window = tuple(min(r, M) for r in theirs)
                other = (window, tuple(0 if r <= M else shift for r in theirs))
            if (mine.window, mine.shift) != other:
                why = (
                    f"transformers' Swinv2 fixes its windows from image_size {c.img_size} with floor division "
                    f"({'x'.join(map(str, theirs))} there)"
                    if theirs != ours
                    else f"{peer} shrinks a window to a smaller map (the 'clamp' rule), this model uses "
                    f"small_map={c.small_map!r} (set model.small_map = 'clamp' to accept {peer}'s rule)"
                )
                raise ValueError(
                    f"cannot write a {peer} model directory: at the training size {c.img_size}, stage {i + 1} "
                    f"({'x'.join(map(str, ours))} map, window {M}) would get window {other[0]}, shift {other[1]} "
                    f"in {peer}, not {mine.window}, {mine.shift} as here: {why}"
                )
    if peer == "transformers" and c.small_map != "clamp":
        logger.warning(
            "transformers' Swin shrinks a window to a map smaller than it ('clamp'); this model uses "
            f"small_map={c.small_map!r}: it agrees at the training size {c.img_size}, not on inputs whose maps "
            "get smaller than a window"
        )


# ----- writing -------------------------------------------------------------------------------------
def _json_value(config: SwinConfig, name: str):
    value = getattr(config, name)
    if name == "img_size":
        h, w = config.img_hw
        return h if h == w else [h, w]
    return list(value) if isinstance(value, tuple) else value


def _dtype(model) -> str:
    p = next(iter(model.parameters()), None)
    return str(p.dtype if p is not None else torch.float32).removeprefix("torch.")


def _marker() -> str:
    from swinx import __version__

    return f"swinx {__version__}"


def _json_writer(value: dict):
    text = json.dumps(value, indent=2) + "\n"
    return lambda tmp: Path(tmp).write_text(text)


def _weights_writer(state: dict[str, torch.Tensor]):
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})


def is_ours(path: Path) -> bool:
    """A directory these writers made: only their files, and config.json names swinx as the writer."""
    try:
        entries = list(path.iterdir())
        if not entries or any(e.name not in OUR_FILES or not e.is_file() or e.is_symlink() for e in entries):
            return False
        return str(read_json(path / CONFIG).get(MARKER, "")).startswith("swinx")
    except (OSError, ValueError):
        return False


def _check_target(out: Path, overwrite: bool) -> None:
    if overwrite or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink():
        entries = sorted(e.name for e in out.iterdir())
        if not entries or is_ours(out):
            return
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} in all)" if len(entries) > 5 else "")
        raise FileExistsError(
            f"{out} is a directory swinx did not write ({shown}); nothing was changed. Choose another output, "
            "empty it, or pass overwrite=True (swinx convert --overwrite) to replace it"
        )
    kind = "a symbolic link" if out.is_symlink() else "a file"
    raise FileExistsError(
        f"{out} exists and is {kind}, not a model directory; nothing was changed. Choose another output or pass "
        "overwrite=True (swinx convert --overwrite) to replace it"
    )


def _write_dir(out: Path, files: dict, overwrite: bool) -> Path:
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, write in files.items():
            atomic_write(tmp / name, write)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give it the mode mkdir would
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dir_fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return out


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and deleted once the new one is in place."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    _check_target(out, overwrite)  # again: it may have changed while the files were written
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
