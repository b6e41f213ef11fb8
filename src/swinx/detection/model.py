"""Swin under torchvision's detectors: the backbone, a feature pyramid, and Faster R-CNN, Mask
R-CNN, RetinaNet or FCOS on top, all of them torchvision's own classes.

    detector = torchvision.models.detection.MaskRCNN(swin_fpn("swin_t"), num_classes=91)
    detector = create_detector("maskrcnn_swin_t_fpn", num_classes=91)

Images reach the network at the size they come in (`NativeSizeTransform`), not rescaled to
800 px as torchvision's default transform does; pass `min_size`/`max_size` to ask for that,
or set `fixed_size` to evaluate at one size.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from swinx.model.backbone import SwinBackbone, create_backbone

DETECTORS = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN, "retinanet": RetinaNet, "fcos": FCOS}
# Which backbone outputs feed the pyramid and which extra levels it grows, as torchvision builds
# them for ResNets: the R-CNNs use strides 4-32 plus a max-pooled stride 64 (P2-P6); RetinaNet
# and FCOS use strides 8-32 plus P6 and P7 convolved from P5 (P3-P7).
PYRAMIDS = {
    "fasterrcnn": ((0, 1, 2, 3), "maxpool"),
    "maskrcnn": ((0, 1, 2, 3), "maxpool"),
    "retinanet": ((1, 2, 3), "p6p7"),
    "fcos": ((1, 2, 3), "p6p7"),
}
_NAME = re.compile(r"(fasterrcnn|maskrcnn|retinanet|fcos)_(.+)_fpn")


class SwinFPN(nn.Module):
    """A Swin backbone under `torchvision.ops.FeaturePyramidNetwork`.

    (B, 3, H, W) -> OrderedDict of (B, out_channels, H_l, W_l), one entry per pyramid level:
    "0".."3" for the backbone outputs used (by index), then "pool" or "p6", "p7". Any H and W:
    the top-down pathway upsamples to each lateral map's own size. `out_channels` is what
    torchvision's detectors read.
    """

    def __init__(self, backbone: SwinBackbone, out_channels: int = 256, extra: str | None = "maxpool"):
        super().__init__()
        self.body = backbone
        extra_blocks = {"maxpool": LastLevelMaxPool(), "p6p7": LastLevelP6P7(out_channels, out_channels), None: None}[
            extra
        ]
        self.fpn = FeaturePyramidNetwork(backbone.channels, out_channels, extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))

    def no_weight_decay(self) -> set[str]:
        return {f"body.{name}" for name in self.body.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.body.set_grad_checkpointing(enable)


def swin_fpn(
    name: str = "swin_t",
    out_channels: int = 256,
    out_indices=(0, 1, 2, 3),
    extra: str | None = "maxpool",
    frozen_stages: int = -1,
    norm_eval: bool = False,
    **overrides,
) -> SwinFPN:
    """The named Swin variant (any `swinx.list_models()` name) as a pyramid for torchvision's detectors.

    The defaults suit Faster and Mask R-CNN (P2-P6); RetinaNet and FCOS take
    `out_indices=(1, 2, 3), extra="p6p7"` (P3-P7). `overrides` are SwinConfig fields
    (drop_path_rate, window_size, small_map, ...).
    """
    backbone = create_backbone(name, out_indices, frozen_stages, norm_eval, **overrides)
    return SwinFPN(backbone, out_channels, extra)


class NativeSizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform (normalise, batch with padding, map boxes back), resizing
    only when asked: with `min_size=None` images keep their size; `fixed_size=(W, H)` (torchvision's
    order) resizes every image to that size, and predictions are mapped back to the original."""

    def __init__(
        self,
        min_size: int | tuple[int, ...] | None = None,
        max_size: int | None = None,
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
        size_divisible: int = 32,
        fixed_size: tuple[int, int] | None = None,
    ):
        super().__init__(
            min_size if min_size is not None else 0,
            max_size or 0,
            list(image_mean),
            list(image_std),
            size_divisible=size_divisible,
            fixed_size=fixed_size,
        )
        self.native = min_size is None

    def resize(self, image, target=None):
        if self.native and self.fixed_size is None:
            return image, target
        return super().resize(image, target)


def parse_detector_name(name: str) -> tuple[str, str]:
    """'maskrcnn_swin_t_fpn' -> ('maskrcnn', 'swin_t')."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise KeyError(
            f"unknown detector {name!r}: expected <detector>_<swin variant>_fpn with detector one of "
            f"{sorted(DETECTORS)}, e.g. maskrcnn_swin_t_fpn, fcos_swinv2_t_fpn"
        )
    return match[1], match[2]


def list_detectors() -> list[str]:
    return [
        f"{kind}_{variant}_fpn"
        for kind in DETECTORS
        for variant in ("swin_t", "swin_s", "swin_b", "swin_l", "swinv2_t", "swinv2_s", "swinv2_b")
    ]


def create_detector(
    name: str = "maskrcnn_swin_t_fpn",
    num_classes: int = 91,
    *,
    fpn_channels: int = 256,
    min_size: int | tuple[int, ...] | None = None,
    max_size: int | None = None,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
    anchor_sizes: tuple[int, ...] | None = None,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    backbone_args: dict | None = None,
    **detector_args,
) -> nn.Module:
    """A torchvision detector on a Swin pyramid: `<fasterrcnn|maskrcnn|retinanet|fcos>_<variant>_fpn`.

    `num_classes` counts the background for the R-CNNs (torchvision's convention: 91 for COCO);
    `backbone_args` are SwinConfig overrides; `anchor_sizes` is one base size per pyramid level
    (default: torchvision's, 32 to 512 for the R-CNNs); `detector_args` go to the detector class
    (box_detections_per_img, rpn_batch_size_per_image, ...). Images keep their size unless
    `min_size` asks for torchvision's resizing (see NativeSizeTransform).
    """
    kind, variant = parse_detector_name(name)
    if kind == "fcos" and fpn_channels % 32:
        raise ValueError(
            f"FCOS's head normalises in 32 groups (GroupNorm): fpn_channels must be a multiple of 32, "
            f"got {fpn_channels}"
        )
    indices, extra = PYRAMIDS[kind]
    backbone = swin_fpn(variant, fpn_channels, indices, extra, frozen_stages, norm_eval, **(backbone_args or {}))
    levels = len(indices) + (1 if extra == "maxpool" else 2)
    if anchor_sizes is not None:
        if len(anchor_sizes) != levels:
            raise ValueError(
                f"{kind} has {levels} pyramid levels: anchor_sizes needs {levels} sizes, got {tuple(anchor_sizes)}"
            )
        if kind == "retinanet":  # three scales per level, as torchvision's RetinaNet
            sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in anchor_sizes)
            ratios = ((0.5, 1.0, 2.0),) * levels
        elif kind == "fcos":  # anchor-free: one point per location, size only sets the level's scale
            sizes, ratios = tuple((s,) for s in anchor_sizes), ((1.0,),) * levels
        else:
            sizes, ratios = tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * levels
        key = "rpn_anchor_generator" if kind in ("fasterrcnn", "maskrcnn") else "anchor_generator"
        detector_args[key] = AnchorGenerator(sizes, ratios)
    detector = DETECTORS[kind](backbone, num_classes=num_classes, **detector_args)
    detector.transform = NativeSizeTransform(min_size, max_size, image_mean, image_std)
    return detector


def detector_backbone(detector: nn.Module) -> SwinBackbone:
    return detector.backbone.body


def set_eval_size(detector: nn.Module, size: tuple[int, int] | None) -> None:
    """Evaluate every image resized to `size` = (H, W) (predictions mapped back), or at its own size (None)."""
    detector.transform.fixed_size = None if size is None else (size[1], size[0])
