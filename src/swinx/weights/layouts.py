"""Checkpoint layouts of the peers: one key rule per layout, in one place.

Each layout is a function from one of our parameter names to the peer's name(s) for
it. Most are one-to-one renames; the rest are pieces: our fused `qkv` is three peer
tensors in Hugging Face, and torchvision's V2 `qkv.bias` holds our `q_bias` and
`v_bias` as its first and last thirds; OpenMMLab's patch merging orders its 4C channels
differently (a permutation, `unfold_order`). The same rule serves loading (gather pieces,
concatenate, un-permute) and exporting (split, permute), so the two directions cannot
drift apart.

OpenMMLab (mmdetection, mmsegmentation, mmpretrain) names are those of the whole mm
model's state dict: `backbone.<key>` for the backbone and, for an mmpretrain classifier
(ImageClassifier + LinearClsHead), `head.fc.*` for the head. mmpretrain's classifier
backbone has one output, `norm3`: our classifier's final `norm` is that `backbone.norm{L-1}`.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import torch

from swinx.model.config import SwinConfig
from swinx.model.position import log_spaced_coords, relative_position_index
from swinx.model.windows import shift_mask, window_geometry

LAYOUTS = ("swinx", "official", "timm", "torchvision", "hf", "hf-hub", "openmmlab")

# Buffers that some peers save although they follow from the config; ignored on load.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


class Piece(NamedTuple):
    """Our tensor (or a part of it) lives in peer tensor `key`, as chunk `part` of `parts` along dim 0.

    `unfold_dim`: along this dim the peer orders patch merging's 4C channels as nn.Unfold
    does (OpenMMLab), see `unfold_order`.
    """

    key: str
    part: int = 0
    parts: int = 1
    unfold_dim: int | None = None


def unfold_order(channels: int) -> torch.Tensor:
    """(4C,) long: OpenMMLab channel m of a patch-merging input is our channel order[m].

    Ours (official, timm, torchvision, HF) concatenates the 2x2 neighbourhood as four blocks
    of C channels, [x(0,0), x(1,0), x(0,1), x(1,1)] with (row, column) offsets: our channel
    (dh, dw, c) is dw * 2C + dh * C + c. OpenMMLab's nn.Unfold(kernel 2, stride 2) puts the
    channel outermost, (c, kh, kw): its channel m = 4c + 2 dh + dw.
    """
    C = channels // 4
    m = torch.arange(4 * C)
    c, dh, dw = m // 4, (m // 2) % 2, m % 2
    return dw * 2 * C + dh * C + c


def to_peer(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """Our tensor in the peer's channel order."""
    if piece.unfold_dim is None:
        return tensor
    return tensor.index_select(piece.unfold_dim, unfold_order(tensor.shape[piece.unfold_dim]).to(tensor.device))


def from_peer(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The peer's tensor in our channel order (the inverse of `to_peer`)."""
    if piece.unfold_dim is None:
        return tensor
    order = unfold_order(tensor.shape[piece.unfold_dim])
    return tensor.index_select(piece.unfold_dim, torch.argsort(order).to(tensor.device))


Rule = Callable[[str, SwinConfig], list[Piece]]

_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)")
_MERGE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")


def _official(key: str, config: SwinConfig) -> list[Piece]:
    return [Piece(key)]


def _timm(key: str, config: SwinConfig) -> list[Piece]:
    # timm >= 0.9 runs patch merging at the start of the next stage.
    if m := _MERGE.fullmatch(key):
        return [Piece(f"layers.{int(m[1]) + 1}.downsample.{m[2]}")]
    return [Piece("head.fc." + key[5:] if key.startswith("head.") else key)]


def _torchvision(key: str, config: SwinConfig) -> list[Piece]:
    if key.startswith("patch_embed."):
        return [Piece(key.replace("patch_embed.proj.", "features.0.0.").replace("patch_embed.norm.", "features.0.2."))]
    if m := _MERGE.fullmatch(key):
        return [Piece(f"features.{2 * int(m[1]) + 2}.{m[2]}")]
    if m := _BLOCK.fullmatch(key):
        prefix, name = f"features.{2 * int(m[1]) + 1}.{m[2]}.", m[3]
        if name in ("attn.q_bias", "attn.v_bias"):  # one qkv bias whose key third is always zero
            return [Piece(prefix + "attn.qkv.bias", 0 if name == "attn.q_bias" else 2, 3)]
        return [Piece(prefix + name.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3."))]
    return [Piece(key)]


def _hf_rule(projections: tuple[str, str, str, str], table: str, mlp: tuple[str, str]) -> Rule:
    """Hugging Face names; `projections` are the q, k, v and output projections within a block."""
    q, k, v, out = projections

    def rule(key: str, config: SwinConfig) -> list[Piece]:
        base = "swin." if config.version == 1 else "swinv2."
        if key.startswith("head."):
            return [Piece("classifier." + key[5:])]
        if key.startswith("patch_embed."):
            return [
                Piece(
                    base
                    + key.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.").replace(
                        "patch_embed.norm.", "embeddings.norm."
                    )
                )
            ]
        if key.startswith("norm."):
            return [Piece(base + "layernorm." + key[5:])]
        if m := _BLOCK.fullmatch(key):
            prefix, name = f"{base}encoder.layers.{m[1]}.blocks.{m[2]}.", m[3]
            param = name.rsplit(".", 1)[-1]
            renames = {
                "norm1.": "layernorm_before.",
                "norm2.": "layernorm_after.",
                "mlp.fc1.": mlp[0] + ".",
                "mlp.fc2.": mlp[1] + ".",
                "attn.proj.": out + ".",
                "attn.relative_position_bias_table": table,
                "attn.logit_scale": "attention.self.logit_scale",
                "attn.cpb_mlp.": "attention.self.continuous_position_bias_mlp.",
                "attn.q_bias": q + ".bias",
                "attn.v_bias": v + ".bias",
            }
            if name.startswith("attn.qkv."):
                return [Piece(f"{prefix}{p}.{param}") for p in (q, k, v)]
            for ours, theirs in renames.items():
                if name.startswith(ours):
                    return [Piece(prefix + theirs + name[len(ours) :])]
            return [Piece(prefix + name)]
        return [Piece(base + "encoder." + key)]  # layers.i.downsample.*

    return rule


_HF_HUB = _hf_rule(
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "attention.self.relative_position_bias_table",
    ("intermediate.dense", "output.dense"),
)
_HF_V1 = _hf_rule(
    ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
    "attention.relative_position_bias.relative_position_bias_table",
    ("mlp.fc1", "mlp.fc2"),
)


def _hf(key: str, config: SwinConfig) -> list[Piece]:
    # Installed transformers (v5) renamed V1's attention; its V2 keeps the hub names.
    return (_HF_V1 if config.version == 1 else _HF_HUB)(key, config)


MM = "backbone."  # OpenMMLab models hold the Swin as `backbone`
_MM_BLOCK = {"attn.": "attn.w_msa.", "mlp.fc1.": "ffn.layers.0.0.", "mlp.fc2.": "ffn.layers.1."}


def _openmmlab(key: str, config: SwinConfig) -> list[Piece]:
    if key.startswith("head."):  # mmpretrain's LinearClsHead
        return [Piece("head.fc." + key[5:])]
    if key.startswith("norm."):  # a classifier's final norm: the mm backbone's last output norm
        return [Piece(f"{MM}norm{len(config.depths) - 1}.{key[5:]}")]
    if key.startswith("patch_embed.proj."):
        return [Piece(MM + "patch_embed.projection." + key[17:])]
    if m := _MERGE.fullmatch(key):
        # V1 merges at the end of stage i as we do; V2 at the start of stage i + 1. Both through nn.Unfold:
        # the 4C input channels of the reduction are permuted, and V1's norm, which sees the 4C input.
        stage, name = int(m[1]) + (config.version == 2), m[2]
        dim = 1 if name == "reduction.weight" else 0 if config.version == 1 else None
        return [Piece(f"{MM}stages.{stage}.downsample.{name}", unfold_dim=dim)]
    if m := _BLOCK.fullmatch(key):
        prefix, name = f"{MM}stages.{m[1]}.blocks.{m[2]}.", m[3]
        for ours, theirs in _MM_BLOCK.items():
            if name.startswith(ours):
                return [Piece(prefix + theirs + name[len(ours) :])]
        return [Piece(prefix + name)]  # norm1, norm2
    return [Piece(MM + key)]  # absolute_pos_embed, a backbone's output norms norm0..norm3


RULES: dict[str, Rule] = {
    "swinx": _official,
    "official": _official,
    "timm": _timm,
    "torchvision": _torchvision,
    "hf": _hf,
    "hf-hub": _HF_HUB,
    "openmmlab": _openmmlab,
}

# The output norms of a dense backbone (ours, OpenMMLab's, the official detection repo's).
OUTPUT_NORM = re.compile(r"(?:backbone\.)?norm(\d+)\.(weight|bias)")


def peer_pieces(layout: str, key: str, config: SwinConfig) -> list[Piece]:
    if layout not in RULES:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    return RULES[layout](key, config)


def unsupported(layout: str, config: SwinConfig) -> str | None:
    """Why `layout` cannot hold a model of `config`, or None."""
    if config.ape and layout in ("timm", "torchvision", "hf", "hf-hub"):
        return f"the {layout} layout has no absolute position embedding (ape=True)"
    if layout == "torchvision" and any(config.pretrained_window_sizes):
        return "torchvision's V2 has no pretrained_window_sizes"
    if layout in ("hf", "hf-hub") and not config.qkv_bias:
        return "Hugging Face's Swin always has q/v biases (qkv_bias=False)"
    return None


def detect_layout(state_dict: dict[str, torch.Tensor], wrapped: bool = False) -> str:
    """Name the layout of a state dict from its keys. `wrapped`: it came inside {"model": ...} (official).

    Keys under `backbone.` (a whole OpenMMLab or official-detection model) are read without it.
    """
    state_dict = strip_backbone_prefix(state_dict)
    keys = list(state_dict)
    has = lambda fragment: any(fragment in k for k in keys)  # noqa: E731
    if has("features.0.0.weight"):
        return "torchvision"
    if has("embeddings.patch_embeddings.projection"):
        # Installed transformers renamed only V1's keys; V2 keeps the hub names, which "hf" means for it.
        old_v1 = has("attention.self.query") and not has("continuous_position_bias_mlp")
        return "hf-hub" if old_v1 else "hf"
    if has("patch_embed.projection."):  # HF's is embeddings.patch_embeddings.projection, caught above
        return "openmmlab"
    if has("head.fc.") or (has("layers.1.downsample.") and not has("layers.0.downsample.")):
        return "timm"
    if "patch_embed.proj.weight" in state_dict:
        return "official" if wrapped or has("relative_position_index") else "swinx"
    raise ValueError(
        "unrecognised checkpoint layout: no patch embedding key of any known layout "
        f"(first keys: {keys[:5]}); pass layout= one of {LAYOUTS}"
    )


def model_parts(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split a whole OpenMMLab model's state dict (`backbone.*` beside `neck.*`, `rpn_head.*`, `roi_head.*`,
    `decode_head.*`, `auxiliary_head.*`, ...) into the backbone with a classifier's `head.*`, and the
    names of the rest, which no Swin model holds. A state dict without `backbone.` keys is kept whole."""
    if not any(k.startswith(MM) for k in state_dict):
        return state_dict, []
    keep = {k: v for k, v in state_dict.items() if k.startswith((MM, "head."))}
    return keep, sorted(k for k in state_dict if k not in keep)


def strip_backbone_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`backbone.<key>` -> `<key>` (the official detection repo saves official names under `backbone.`)."""
    return {k.removeprefix(MM): v for k, v in state_dict.items()}


def normalise_prefix(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The keys as `layout`'s rule names them: `backbone.` in front for OpenMMLab, none for the others."""
    return add_mm_prefix(state_dict) if layout == "openmmlab" else strip_backbone_prefix(state_dict)


def add_mm_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare OpenMMLab backbone state dict (`model.backbone.state_dict()`) gets the whole model's `backbone.`."""
    if any(k.startswith(MM) for k in state_dict):
        return state_dict
    return {(k if k.startswith("head.") else MM + k): v for k, v in state_dict.items()}


def add_hf_prefix(state_dict: dict[str, torch.Tensor], config: SwinConfig) -> dict[str, torch.Tensor]:
    """Hugging Face base models (SwinModel, Swinv2Model) save without the `swin.` / `swinv2.` prefix: add it."""
    if not any(k.startswith("embeddings.") for k in state_dict):
        return state_dict
    base = "swin." if config.version == 1 else "swinv2."
    return {(k if k.startswith("classifier.") else base + k): v for k, v in state_dict.items()}


def derived_buffers(layout: str, model) -> dict[str, torch.Tensor]:
    """Buffers the official code, torchvision and OpenMMLab persist in their state dicts, rebuilt for `model`'s config.

    The official model fixes each block's geometry at its training resolution (img_size);
    torchvision saves the flattened index and, for V2, the coordinate table; OpenMMLab the
    (N, N) index and, for V2, the (1, 2M-1, 2M-1, 2) coordinate table of the nominal window.
    """
    config, out = model.config, {}
    if layout not in ("official", "torchvision", "openmmlab"):
        return out
    grid = model.grid_size
    for i, stage in enumerate(model.layers):
        res = (-(-grid[0] // 2**i), -(-grid[1] // 2**i))
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            if layout == "openmmlab":  # built for the nominal window, whatever the map; no mask buffer
                prefix = f"{MM}stages.{i}.blocks.{j}.attn.w_msa."
                M = config.window_size
                out[prefix + "relative_position_index"] = relative_position_index((M, M))
                if config.version == 2:
                    table = log_spaced_coords((M, M), (attn.pretrained_window_size,) * 2)
                    out[prefix + "relative_coords_table"] = table.reshape(1, 2 * M - 1, 2 * M - 1, 2)
                continue
            if layout == "official":
                prefix = f"layers.{i}.blocks.{j}."
                g = window_geometry(*res, config.window_size, block.shift_size, "clamp")
            else:
                prefix = f"features.{2 * i + 1}.{j}."
                g = window_geometry(config.window_size, config.window_size, config.window_size, 0, "pad")
            window = g.window
            index = relative_position_index(window)
            out[prefix + "attn.relative_position_index"] = index.flatten() if layout == "torchvision" else index
            if config.version == 2:
                pretrained = (attn.pretrained_window_size,) * 2
                table = log_spaced_coords(window, pretrained if layout == "official" else (0, 0))
                out[prefix + "attn.relative_coords_table"] = table.reshape(1, 2 * window[0] - 1, 2 * window[1] - 1, 2)
            if layout == "official" and g.has_shift:
                padded = (res[0] + g.pad[0], res[1] + g.pad[1])
                out[prefix + "attn_mask"] = shift_mask(*padded, window, g.shift)
    return out


def infer_config(state_dict: dict[str, torch.Tensor], layout: str) -> SwinConfig:
    """The architecture a state dict of `layout` was made for, read off its tensor shapes.

    What the weights cannot tell is left at its default: the training resolution, V2's
    pretrained window sizes, and V2's window when no coordinate buffer was saved.
    """
    from swinx.model.position import table_window

    state_dict = normalise_prefix(state_dict, layout)
    version = 2 if any("logit_scale" in k for k in state_dict) else 1
    probe = SwinConfig(version=1) if version == 1 else SwinConfig(version=2, window_size=8, img_size=256)
    name = lambda key: peer_pieces(layout, key, probe)[0].key  # noqa: E731
    get = lambda key: state_dict.get(name(key))  # noqa: E731
    embed = get("patch_embed.proj.weight")
    if embed is None:
        raise ValueError(f"no patch embedding ({name('patch_embed.proj.weight')}) in this {layout} checkpoint")
    depths, heads = [], []
    while get(f"layers.{len(depths)}.blocks.0.norm1.weight") is not None:
        i = len(depths)
        depths.append(next(j for j in range(1000) if get(f"layers.{i}.blocks.{j}.norm1.weight") is None))
        per_head = "attn.relative_position_bias_table" if version == 1 else "attn.logit_scale"
        heads.append(get(f"layers.{i}.blocks.0.{per_head}").shape[1 if version == 1 else 0])
    if version == 1:
        window = table_window(get("layers.0.blocks.0.attn.relative_position_bias_table").shape[0])
    else:
        coords = get("layers.0.blocks.0.attn.relative_coords_table")
        window = (coords.shape[1] + 1) // 2 if coords is not None else probe.window_size
    head = get("head.weight")
    fc1 = get("layers.0.blocks.0.mlp.fc1.weight")
    bias_key = "attn.qkv.bias" if version == 1 else "attn.q_bias"
    return SwinConfig(
        version=version,
        patch_size=embed.shape[-1],
        in_chans=embed.shape[1],
        embed_dim=embed.shape[0],
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=window,
        num_classes=head.shape[0] if head is not None else 0,
        mlp_ratio=fc1.shape[0] / embed.shape[0],
        qkv_bias=get(f"layers.0.blocks.0.{bias_key}") is not None or layout == "torchvision",
        ape=name("absolute_pos_embed") in state_dict,
        patch_norm=get("patch_embed.norm.weight") is not None,
        img_size=probe.img_size,
    )
