"""UperNet on the Swin backbone: semantic segmentation at any input size.

    segmenter = create_segmenter("upernet_swin_t", num_classes=150)
    logits = segmenter(images)["out"]          # (B, 150, H, W) for (B, 3, H, W) images in [0, 1]

The decoder is the one the Swin paper trains on ADE20K (UperNet, Xiao et al. 2018, as
mmsegmentation's UPerHead builds it): a pyramid pooling module on the last stage (pool scales
1, 2, 3, 6), 1x1 laterals on the other stages, a top-down pathway, a 3x3 conv per level, all
four levels upsampled to stride 4, concatenated and fused by a 3x3 conv, then dropout and a
1x1 classifier. The optional auxiliary head is an FCN on stage 3 (one 3x3 conv), weighted 0.4
in the loss. Every block is torchvision's `Conv2dNormActivation` (conv, norm, ReLU).

The network normalises its input itself (ImageNet mean and std), so callers hand it images
scaled to [0, 1], and it returns logits at the input's own size, whatever that size is: the
backbone pads to its patch and window grid internally, and the decoder resizes with bilinear
interpolation (align_corners=False), so a 300x451 image gives 300x451 logits.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from swinx.model.backbone import SwinBackbone, create_backbone
from swinx.model.ops import bilinear_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = ("bn", "gn")
_NAME = re.compile(r"upernet_(.+)")


def norm_layer(kind: str, groups: int = 32):
    """BatchNorm (mmsegmentation's; SyncBatchNorm under DDP on GPUs, see `convert_sync_batchnorm`) or
    GroupNorm (per image: the same result for any split of a batch over processes, and on CPUs)."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":  # at most `groups` groups of at least 2 channels (a pooled 1x1 map still normalises)
        return lambda channels: nn.GroupNorm(
            max(g for g in range(1, min(groups, channels // 2) + 1) if channels % g == 0), channels
        )
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return bilinear_resize(x, size)  # F.interpolate(bilinear, align_corners=False), faster on small maps


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the map average-pooled to each scale x scale grid, projected,
    upsampled back, concatenated with the map and fused by a 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int], norm):
        super().__init__()
        block = partial(Conv2dNormActivation, norm_layer=norm, activation_layer=nn.ReLU)
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), block(in_channels, channels, 1)) for s in self.scales
        )
        self.bottleneck = block(in_channels + len(self.scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return self.bottleneck(torch.cat([x] + [_resize(b(x), size) for b in self.branches], dim=1))


class UperHead(nn.Module):
    """UperNet's decoder: feature maps of strides 4..32 -> logits at stride 4, (B, num_classes, H/4, W/4)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: str = "bn",
    ):
        super().__init__()
        layer = norm_layer(norm)
        block = partial(Conv2dNormActivation, norm_layer=layer, activation_layer=nn.ReLU)
        *lower, top = in_channels
        self.ppm = PyramidPooling(top, channels, pool_scales, layer)
        self.laterals = nn.ModuleList(block(c, channels, 1) for c in lower)
        self.fpn_convs = nn.ModuleList(block(channels, channels, 3) for _ in lower)
        self.fuse = block(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        *lower, top = features
        maps = [lateral(f) for lateral, f in zip(self.laterals, lower)] + [self.ppm(top)]
        for i in range(len(maps) - 1, 0, -1):  # top-down: each level gets the upsampled coarser one
            maps[i - 1] = maps[i - 1] + _resize(maps[i], maps[i - 1].shape[-2:])
        outs = [conv(m) for conv, m in zip(self.fpn_convs, maps[:-1])] + [maps[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: `num_convs` 3x3 convs on one stage, dropout and a 1x1 classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        dropout: float = 0.1,
        norm="bn",
    ):
        super().__init__()
        block = partial(Conv2dNormActivation, norm_layer=norm_layer(norm), activation_layer=nn.ReLU)
        self.convs = nn.Sequential(*(block(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class UperNet(nn.Module):
    """Backbone + UperHead (+ FCN auxiliary head). (B, 3, H, W) in [0, 1] -> OrderedDict:

    "out": (B, num_classes, H, W) logits at the input's size; in training mode, with an auxiliary
    head, also "aux" (same shape), as torchvision's segmentation models name them. In eval mode the
    auxiliary head is not run.
    """

    def __init__(
        self,
        backbone: SwinBackbone,
        num_classes: int,
        channels: int = 512,
        aux_channels: int | None = 256,
        aux_index: int = 2,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: str = "bn",
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if list(backbone.out_indices) != list(range(len(backbone.channels))) or len(backbone.channels) < 2:
            raise ValueError("UperNet reads every stage: build the backbone with out_indices (0, 1, ..., n-1)")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.decode_head = UperHead(backbone.channels, num_classes, channels, pool_scales, dropout, norm)
        self.aux_index = aux_index
        self.auxiliary_head = (
            FCNHead(backbone.channels[aux_index], num_classes, aux_channels, 1, dropout, norm) if aux_channels else None
        )
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        size = images.shape[-2:]
        features = list(self.backbone((images - self.image_mean) / self.image_std).values())
        result = OrderedDict(out=_resize(self.decode_head(features), size))
        if self.training and self.auxiliary_head is not None:
            result["aux"] = _resize(self.auxiliary_head(features[self.aux_index]), size)
        return result

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def parse_segmenter_name(name: str) -> str:
    """'upernet_swin_t' -> 'swin_t'."""
    from swinx.model.variants import list_models

    match = _NAME.fullmatch(name)
    if match is None or match[1] not in list_models():
        raise KeyError(
            f"unknown segmenter {name!r}: expected upernet_<swin variant>, e.g. upernet_swin_t, upernet_swinv2_s "
            f"(variants: {', '.join(list_models())})"
        )
    return match[1]


def list_segmenters() -> list[str]:
    from swinx.model.variants import list_models

    return [f"upernet_{v}" for v in list_models()]


def create_segmenter(
    name: str = "upernet_swin_t",
    num_classes: int = 150,
    *,
    channels: int = 512,
    aux_channels: int | None = 256,
    norm: str = "bn",
    dropout: float = 0.1,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    frozen_stages: int = -1,
    backbone_args: dict | None = None,
) -> UperNet:
    """UperNet on a named Swin variant (any `swinx.list_models()` name, V1 or V2): "upernet_<variant>".

    The defaults are the paper's ADE20K model (512 channels, auxiliary FCN of 256 on stage 3,
    BatchNorm); `aux_channels=None` drops the auxiliary head; `backbone_args` are SwinConfig
    overrides (drop_path_rate, window_size, small_map, embed_dim, ...). Backbone weights load with
    `swinx.load_checkpoint(segmenter.backbone, path)` from any classification or OpenMMLab file.
    """
    variant = parse_segmenter_name(name)
    args = dict(backbone_args or {})
    depths = args.get("depths")
    stages = len(depths) if depths is not None else 4
    backbone = create_backbone(variant, tuple(range(stages)), frozen_stages, **args)
    aux_index = min(2, stages - 2)
    return UperNet(backbone, num_classes, channels, aux_channels, aux_index, pool_scales, dropout, norm)
