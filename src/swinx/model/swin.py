"""The Swin Transformer, V1 and V2, read top to bottom: patches, blocks, stages, model.

Every tensor between modules is channels-last, (B, H, W, C); window geometry lives in
windows.py, position bias in position.py, attention in attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from swinx.model import ops
from swinx.model.attention import WindowAttention, caching_allowed
from swinx.model.config import SwinConfig
from swinx.model.windows import (
    WindowGeometry,
    cyclic_shift,
    pad_map,
    permute_tokens,
    round_up,
    window_geometry,
    window_index,
    window_order,
    window_partition,
    window_reverse,
)


class PatchEmbed(nn.Module):
    """(B, in_chans, H, W) -> (B, ceil(H/p), ceil(W/p), embed_dim) by a strided conv.

    The image is zero-padded to a multiple of p first.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = round_up(x.shape[2], p) - x.shape[2], round_up(x.shape[3], p) - x.shape[3]
        if torch.compiler.is_compiling() or pad_h or pad_w:  # no guard on the size when compiled (pad_map)
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H', W', C)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C): each 2x2 neighbourhood concatenated, normalised, projected.

    V1 normalises the 4C input (norm then reduction); V2 the 2C output (reduction then norm).
    """

    def __init__(self, dim: int, version: int = 1):
        super().__init__()
        self.version = version
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim if version == 1 else 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        Hp, Wp = round_up(H, 2), round_up(W, 2)
        x = pad_map(x, (Hp - H, Wp - W))
        # Channel order [x(0,0), x(1,0), x(0,1), x(1,1)] as (row, col) offsets: column offset outer.
        x = x.view(B, Hp // 2, 2, Wp // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, Hp // 2, Wp // 2, 4 * C)
        if self.version == 1:
            return ops.linear(ops.layer_norm(x, self.norm), self.reduction.weight, None)
        return ops.layer_norm(ops.linear(x, self.reduction.weight, None), self.norm)


class Mlp(nn.Module):
    """fc1, GELU, fc2, after `norm` when one is given.

    With `fused`, GELU runs inside fc1's kernel where ops.linear can (CPU inference), and a
    training step saves only the input and fc1's output (`ops.lean_mlp`).
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.fused = True

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        if self._lean(x, norm):
            fc1, fc2 = self.fc1, self.fc2
            nw, nb, eps = (norm.weight, norm.bias, norm.eps) if norm is not None else (None, None, 0.0)
            return ops.lean_mlp(x, nw, nb, eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if norm is not None:
            x = ops.layer_norm(x, norm, fast=self.fused)
        x = ops.linear(x, self.fc1.weight, self.fc1.bias, gelu=True, fast=self.fused)
        return self.drop(ops.linear(self.drop(x), self.fc2.weight, self.fc2.bias, fast=self.fused))

    def _lean(self, x: torch.Tensor, norm: nn.LayerNorm | None) -> bool:
        if not self.fused or (self.training and self.drop.p) or (norm is not None and norm.weight is None):
            return False
        params = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return ops.mlp_trains_lean(x, *params, *((norm.weight, norm.bias) if norm is not None else ()))


class SwinBlock(nn.Module):
    """One (shifted) window attention block on a (B, H, W, C) map.

    V1 is pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)).
    V2 is residual post-norm: x + norm1(attn(x)), then x + norm2(mlp(x)).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        version: int = 1,
        pretrained_window_size: int = 0,
        small_map: str = "clamp",
    ):
        super().__init__()
        self.window_size, self.shift_size, self.version, self.small_map = window_size, shift_size, version, small_map
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, num_heads, window_size, qkv_bias, attn_drop, drop, version, pretrained_window_size
        )
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.version == 1:
            x = x + self.drop_path(self.window_attention(ops.layer_norm(x, self.norm1, fast=self.attn.fused)))
            return x + self.drop_path(self.mlp(x, norm=self.norm2))
        x = x + self.drop_path(self.window_attention(x, post_norm=self.norm1))
        return x + self.drop_path(ops.layer_norm(self.mlp(x), self.norm2, fast=self.mlp.fused))

    def window_attention(self, x: torch.Tensor, return_attn: bool = False, post_norm: nn.Module | None = None):
        """Pad, roll, partition, attend, reverse, roll back, crop: (B, H, W, C) -> (B, H, W, C).

        The map is padded before the roll so that padding stays at the bottom/right of the
        unshifted map; rolling first would wrap real tokens next to far-away ones.
        """
        if torch.compiler.is_exporting() and not return_attn:
            return self.indexed_window_attention(x, post_norm)
        B, H, W, C = x.shape
        geometry = window_geometry(H, W, self.window_size, self.shift_size, self.small_map)
        padded = (H + geometry.pad[0], W + geometry.pad[1])
        x = pad_map(x, geometry.pad)
        if not return_attn and self.attn.native_takes(x):  # the C kernel reads and writes the map in place
            tokens = self.attn._cached(
                ("tokens", padded, geometry, x.device), lambda: self._tokens(geometry, padded, x)
            )
            x = self.attn.attend_map(x.reshape(B, -1, C), tokens, geometry, padded).view(B, *padded, C)
            return self._finish(x, H, W, padded, None, post_norm, return_attn)
        order = self._window_order(geometry, padded, x.device)
        if order is not None:  # eager with a shift: roll and partition as one gather
            N = geometry.window[0] * geometry.window[1]
            windows = permute_tokens(x.reshape(B, -1, C), *order).view(B, -1, N, C)
        else:
            windows = window_partition(cyclic_shift(x, geometry.shift), geometry.window)  # (B, nW, N, C)
        out = self.attn(windows, geometry, padded, return_attn)
        windows, attn = out if return_attn else (out, None)
        if order is not None:  # window reverse and roll back as one gather
            x = permute_tokens(windows.reshape(B, -1, C), order[1], order[0]).view(B, *padded, C)
        else:
            x = cyclic_shift(window_reverse(windows, geometry.window, *padded), geometry.shift, reverse=True)
        return self._finish(x, H, W, padded, attn, post_norm, return_attn)

    @staticmethod
    def _tokens(geometry: WindowGeometry, padded: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        return window_order(*padded, geometry, x.device)[0].contiguous()

    @staticmethod
    def _finish(x, H, W, padded, attn, post_norm, return_attn):
        """V2's post-norm, then the crop back to (H, W)."""
        if post_norm is not None:  # V2's norm is per token: applied before the crop, on a contiguous map
            x = ops.layer_norm(x, post_norm)
        if torch.compiler.is_compiling():
            # Always crop, into a fresh contiguous map: whether a crop view is contiguous depends
            # on the size, and asking would make dynamic-shape graphs recompile when it changes.
            x = x[:, :H, :W].clone(memory_format=torch.contiguous_format)
        elif padded != (H, W):
            x = x[:, :H, :W]
        return (x, attn) if return_attn else x

    def _window_order(self, geometry, padded, device):
        """The cached `window_order` permutations of a shifted block in eager mode, else None (no shift:
        the partition is one copy already; compiled or traced: the graph fuses the copies itself)."""
        if not geometry.has_shift or not caching_allowed():
            return None
        key = ("order", padded, geometry, device)
        return self.attn._cached(key, lambda: window_order(*padded, geometry, device))

    def indexed_window_attention(self, x: torch.Tensor, post_norm: nn.Module | None = None) -> torch.Tensor:
        """`window_attention` as gathers by `WindowIndex`: the same numbers, one graph for every size.

        Exported with symbolic sizes, padding, rolling and the small-map rules would need the
        sizes in branches and in shapes; here they are only in index arithmetic.
        """
        B, H, W, C = x.shape
        M = self.window_size
        index = window_index(H, W, M, self.shift_size, self.small_map, x.device)
        flat = torch.cat([x.reshape(B, H * W, C), x.new_zeros(B, 1, C)], dim=1)  # the last token is the padding
        windows = flat.index_select(1, index.gather).view(B, index.num_windows, M * M, C)
        out = self.attn(windows, bias=self.attn.indexed_bias(index))
        out = out.reshape(B, index.num_windows * M * M, C).index_select(1, index.scatter).view(B, H, W, C)
        return post_norm(out) if post_norm is not None else out


class SwinStage(nn.Module):
    """A run of blocks alternating regular and shifted windows, then (except in the last stage) patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_paths: list[float],
        downsample: bool,
        config: SwinConfig,
        pretrained_window_size: int = 0,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                0 if i % 2 == 0 else window_size // 2,
                config.mlp_ratio,
                config.qkv_bias,
                config.drop_rate,
                config.attn_drop_rate,
                drop_paths[i],
                config.version,
                pretrained_window_size,
                config.small_map,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, config.version) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks only: (B, H, W, C) -> (B, H, W, C). Patch merging is `self.downsample`."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class SwinTrunk(nn.Module):
    """Patch embedding, absolute position embedding and the stages: what the classifier
    (`SwinTransformer`) and the dense backbone (`swinx.model.backbone.SwinBackbone`) share.

    Parameter names are the official ones (`patch_embed.*`, `absolute_pos_embed`,
    `layers.i.*`), so the two load the same checkpoints. Subclasses add their outputs and
    then call `self.apply(self._init_weights)`.
    """

    def __init__(self, config: SwinConfig | None = None, **overrides):
        super().__init__()
        config = (config or SwinConfig()).replace(**overrides) if overrides else (config or SwinConfig())
        self.config = config
        c = config
        self.num_features = c.num_features
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim, c.patch_norm)
        self.grid_size = tuple(-(-s // c.patch_size) for s in c.img_hw)
        if c.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], c.embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(c.drop_rate)
        rates = torch.linspace(0, c.drop_path_rate, sum(c.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(c.depths):
            start = sum(c.depths[:i])
            self.layers.append(
                SwinStage(
                    c.embed_dim * 2**i,
                    depth,
                    c.num_heads[i],
                    c.window_size,
                    rates[start : start + depth],
                    i < len(c.depths) - 1,
                    c,
                    c.pretrained_window_sizes[i],
                )
            )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----- settings -------------------------------------------------------------------------
    def blocks(self):
        return (block for stage in self.layers for block in stage.blocks)

    @property
    def small_map(self) -> str:
        return self.config.small_map

    @small_map.setter
    def small_map(self, policy: str) -> None:
        self.config = self.config.replace(small_map=policy)
        for block in self.blocks():
            block.small_map = policy

    def set_fused_attn(self, enable: bool = True) -> None:
        """Fast kernels (fused attention, oneDNN linear + GELU) or the plain PyTorch ops."""
        for block in self.blocks():
            block.attn.fused = block.mlp.fused = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay: norms, biases, position tables, V2 temperatures."""
        position = ("absolute_pos_embed", "relative_position_bias_table", "cpb_mlp", "logit_scale")
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or any(k in name for k in position)}

    # ----- forward --------------------------------------------------------------------------
    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"expected a torch.Tensor of shape (B, {self.config.in_chans}, H, W), got {type(x).__name__}"
            )
        if x.dim() != 4:
            hint = " (a single image: add the batch axis with x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(
                f"expected a 4-D input (B, {self.config.in_chans}, H, W), got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != self.config.in_chans:
            raise ValueError(
                f"expected {self.config.in_chans} input channels, got {x.shape[1]} (input shape "
                f"{tuple(x.shape)}); convert the images, or build the model with in_chans={x.shape[1]}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point input, got {x.dtype}; convert it, e.g. x.float() / 255, then normalise"
            )
        if x.shape[0] == 0:
            raise ValueError("empty batch: the input has batch size 0")
        p = self.config.patch_size
        if x.shape[2] < p or x.shape[3] < p:
            raise ValueError(f"image {x.shape[2]}x{x.shape[3]} is smaller than one {p}x{p} patch")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)  # (B, H, W, C)
        if self.absolute_pos_embed is not None:
            x = x + self._position_embedding(x.shape[1], x.shape[2])
        return self.pos_drop(x)

    def _position_embedding(self, height: int, width: int) -> torch.Tensor:
        gh, gw = self.grid_size
        pos = self.absolute_pos_embed.reshape(1, gh, gw, -1)
        if torch.compiler.is_exporting() or (height, width) != (gh, gw):  # bicubic to the same size is exact
            pos = F.interpolate(
                pos.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False
            ).permute(0, 2, 3, 1)
        return pos

    def stage_outputs(self, x: torch.Tensor, stages: int | None = None) -> list[torch.Tensor]:
        """(B, in_chans, H, W) -> the first `stages` (default: all) stage outputs before their patch
        merging, channels-last: stage i gives (B, ceil(H / (patch * 2**i)), ceil(W / (patch * 2**i)), C * 2**i)."""
        stages = len(self.layers) if stages is None else stages
        x = self._embed(x)
        outputs = []
        for i, stage in enumerate(self.layers[:stages]):
            x = stage(x)
            outputs.append(x)
            if stage.downsample is not None and i + 1 < stages:  # the last map asked for needs no merging
                x = stage.downsample(x)
        return outputs


class SwinTransformer(SwinTrunk):
    """Swin Transformer V1 / V2 classifier on images of any size and aspect ratio.

    Input (B, in_chans, H, W) float; logits (B, num_classes). Parameter names follow the
    official implementation, so its checkpoints load as they are.
    """

    def __init__(self, config: SwinConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.num_classes = c.num_classes
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (0: no head, pooled features out)."""
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        device = self.norm.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self._init_weights(self.head)

    # ----- forward --------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalised last-stage map (B, H/32, W/32, num_features)."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return ops.layer_norm(x, self.norm)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, C) -> pooled features (B, C) if pre_logits, else logits (B, num_classes)."""
        x = self.head_drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage before its patch merging, each (B, C_i, H_i, W_i): multi-scale features."""
        return [f.permute(0, 3, 1, 2) for f in self.stage_outputs(x)]
