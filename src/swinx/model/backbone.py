"""The Swin Transformer as a dense-prediction backbone: multi-scale maps for FPNs, detectors, segmenters.

`SwinBackbone` is the classifier's trunk (the same `PatchEmbed`, `SwinStage` and block
classes, the same parameter names) with one LayerNorm per output, `norm{i}`, as in
OpenMMLab and the official detection repository. Any classification checkpoint of any
layout loads into it (head and final norm dropped, output norms left freshly initialised),
and so do OpenMMLab and official-detection backbone checkpoints (output norms included).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from swinx.model import ops
from swinx.model.config import SwinConfig
from swinx.model.swin import SwinTrunk


class SwinBackbone(SwinTrunk):
    """(B, in_chans, H, W) -> OrderedDict {"i": (B, C_i, H_i, W_i)} for i in `out_indices`.

    Output i is stage i's map before its patch merging, after its own LayerNorm `norm{i}`,
    channels-first: C_i = embed_dim * 2**i, H_i = ceil(H / (patch * 2**i)) (likewise W_i).
    It equals `SwinTransformer.forward_intermediates` of the same weights followed by the norms.

    `frozen_stages` (mmdetection's semantics): -1 freezes nothing; 0 freezes the patch
    embedding (and the absolute position embedding); k >= 1 also freezes stages 0..k-1 with
    their patch merging (ours sits at the end of a stage, V1 and V2 alike, so freezing stage
    k-1 freezes the merging into stage k) and the output norms norm0..norm{k-1} that exist.
    Frozen parts get requires_grad=False and stay in eval mode (no dropout, no stochastic
    depth) even after `train()`.

    `norm_eval`: `train()` leaves every normalisation layer with running statistics
    (BatchNorm, SyncBatchNorm, InstanceNorm with track_running_stats) in eval mode, as
    mmdetection's ResNet does. The Swin itself has only LayerNorms, which compute the same
    in train and eval mode, so for it this is a no-op kept for config compatibility; it acts
    on such layers that a user adds to this module.

    Stages after the last output index are built (checkpoints load strictly) but not run.
    """

    def __init__(
        self,
        config: SwinConfig | None = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        **overrides,
    ):
        config = (config or SwinConfig()).replace(**overrides) if overrides else (config or SwinConfig())
        if config.num_classes:
            config = config.replace(num_classes=0)  # no classifier: keep the config honest
        super().__init__(config)
        stages = len(config.depths)
        indices = sorted({int(i) + stages if int(i) < 0 else int(i) for i in out_indices})  # -1: the last stage
        if not indices or any(not 0 <= i < stages for i in indices):
            raise ValueError(
                f"out_indices must name stages 0..{stages - 1} (or -{stages}..-1), got {tuple(out_indices)}"
            )
        if not -1 <= frozen_stages <= stages:
            raise ValueError(f"frozen_stages must be -1 (none) .. {stages} (all), got {frozen_stages}")
        self.out_indices = tuple(indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.channels = [config.embed_dim * 2**i for i in self.out_indices]
        self.strides = [config.patch_size * 2**i for i in self.out_indices]
        for i, channels in zip(self.out_indices, self.channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.apply(self._init_weights)
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        frozen = [self.patch_embed, self.pos_drop]
        for i in range(self.frozen_stages):
            frozen.append(self.layers[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f"norm{i}"))
        return frozen

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if self.frozen_stages >= 0 and self.absolute_pos_embed is not None:
            self.absolute_pos_embed.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinBackbone:
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, (_BatchNorm, _InstanceNorm)):  # LayerNorm has no train/eval difference
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.stage_outputs(x, self.out_indices[-1] + 1)
        return OrderedDict(
            (str(i), ops.layer_norm(maps[i], getattr(self, f"norm{i}")).permute(0, 3, 1, 2).contiguous())
            for i in self.out_indices
        )

    def extra_repr(self) -> str:
        return (
            f"out_indices={self.out_indices}, channels={self.channels}, strides={self.strides}, "
            f"frozen_stages={self.frozen_stages}, norm_eval={self.norm_eval}, small_map={self.small_map!r}"
        )


def create_backbone(
    name: str = "swin_t",
    out_indices: Sequence[int] = (0, 1, 2, 3),
    frozen_stages: int = -1,
    norm_eval: bool = False,
    **overrides,
) -> SwinBackbone:
    """A named variant (any `create_model` name) as a dense backbone; SwinConfig fields can be overridden,
    e.g. create_backbone("swin_t", drop_path_rate=0.2, small_map="pad_shift")."""
    from swinx.model.variants import get_config

    if overrides.get("num_classes"):
        raise TypeError("a backbone has no classifier: num_classes does not apply")
    return SwinBackbone(get_config(name, **{**overrides, "num_classes": 0}), out_indices, frozen_stages, norm_eval)
