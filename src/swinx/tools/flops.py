"""Multiply-accumulates of a Swin Transformer, analytic (the official convention) and counted.

The official code reports MACs and calls them FLOPs: 4.49G for Swin-T at 224. Its convention
counts the linear layers and the two attention matmuls, one MAC per LayerNorm element, and
nothing for softmax, GELU, the bias or the shift. `macs()` follows it term by term, at any
input size (maps that do not divide are counted as the model runs them: padded), and
`counted_flops()` asks torch.utils.flop_counter what the model really executes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from swinx.model import ops
from swinx.model.config import SwinConfig
from swinx.model.windows import window_geometry


@dataclass(frozen=True)
class StageMacs:
    """MACs of one part of the network, with the map it runs on."""

    name: str
    height: int
    width: int
    macs: int


def attention_macs(tokens: int, dim: int, heads: int) -> int:
    """One window of N tokens: qkv, q @ k^T, attn @ v, proj (the official WindowAttention.flops)."""
    return tokens * dim * 3 * dim + 2 * heads * tokens * (dim // heads) * tokens + tokens * dim * dim


def block_macs(
    height: int, width: int, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, small_map: str = "clamp"
) -> int:
    g = window_geometry(height, width, window, shift, small_map)
    ph, pw = height + g.pad[0], width + g.pad[1]
    windows = (ph // g.window[0]) * (pw // g.window[1])
    norms = 2 * height * width * dim
    return (
        norms
        + windows * attention_macs(g.window[0] * g.window[1], dim, heads)
        + int(2 * height * width * dim * dim * mlp_ratio)
    )


def macs(config: SwinConfig, img_size: int | tuple[int, int] | None = None) -> list[StageMacs]:
    """MACs per part (patch_embed, stage1..N, head) at `img_size` (default: the config's)."""
    c = config
    h, w = (img_size, img_size) if isinstance(img_size, int) else (img_size or c.img_hw)
    h, w = math.ceil(h / c.patch_size), math.ceil(w / c.patch_size)
    parts = [
        StageMacs(
            "patch_embed",
            h,
            w,
            h * w * c.embed_dim * c.in_chans * c.patch_size**2 + (h * w * c.embed_dim if c.patch_norm else 0),
        )
    ]
    grid = h * w
    dim = c.embed_dim
    for i, (depth, heads) in enumerate(zip(c.depths, c.num_heads)):
        total = sum(
            block_macs(
                h, w, dim, heads, c.window_size, 0 if j % 2 == 0 else c.window_size // 2, c.mlp_ratio, c.small_map
            )
            for j in range(depth)
        )
        name = f"stage{i + 1}"
        if i < len(c.depths) - 1:  # patch merging: norm over 4C, then 4C -> 2C on the halved map
            h2, w2 = math.ceil(h / 2), math.ceil(w / 2)
            total += h * w * dim + h2 * w2 * 4 * dim * 2 * dim
            parts.append(StageMacs(name, h, w, total))
            h, w, dim = h2, w2, dim * 2
        else:
            parts.append(StageMacs(name, h, w, total))
    # The official final term is num_features * H0 * W0 / 2**num_layers, not the last map's
    # H * W (it is 2x that at four stages); kept, so the totals match the published numbers.
    parts.append(StageMacs("head", h, w, c.num_features * grid // 2 ** len(c.depths) + c.num_features * c.num_classes))
    return parts


def counted_flops(model: torch.nn.Module, img_size: int | tuple[int, int] | None = None) -> dict[str, int]:
    """FLOPs (2 per MAC) that torch.utils.flop_counter sees in one forward of one image.

    Keys are those of `macs()`: patch_embed, stage1..N (with their patch merging), head (with
    the final norm), and total.
    """
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (img_size, img_size) if isinstance(img_size, int) else (img_size or model.config.img_hw)
    x = torch.zeros(1, model.config.in_chans, h, w)
    counter = FlopCounterMode(display=False, depth=3)
    fused = [block.attn.fused for block in model.blocks()]
    model.set_fused_attn(False)  # the counter has no formula for the fused CPU kernels: count plain ops
    try:
        with counter, torch.no_grad(), ops.plain_ops():
            model(x)
    finally:
        for block, flag in zip(model.blocks(), fused):
            block.attn.fused = block.mlp.fused = flag
    out = {"total": counter.get_total_flops()}
    for name, counts in counter.get_flop_counts().items():
        parts = name.split(".")[1:]  # drop the root module's name
        if parts == ["patch_embed"]:
            key = "patch_embed"
        elif parts[:1] == ["layers"] and (len(parts) == 2 or parts[2:] == ["downsample"]):
            # forward_features calls the merging after the stage's forward: counted apart, added here
            key = f"stage{int(parts[1]) + 1}"
        elif parts in (["norm"], ["head"]):
            key = "head"
        else:
            continue
        out[key] = out.get(key, 0) + sum(counts.values())
    return out
