"""Exactness against the live reference implementations: timm, torchvision, Hugging Face transformers.

Each case randomises every parameter of the peer model, loads its state dict into swinx
with `load_checkpoint` (layout detected automatically) and compares logits; then it
randomises a swinx model, exports it with `export_state_dict`, loads that strictly into the
peer's own class and compares again.
"""

from __future__ import annotations

import pytest
import torch

import swinx
from helpers import SMALL, max_diff, randomize

TOL = 1e-4
NUM_CLASSES = 11


def timm_model(version: int, img: int, window: int):
    import timm

    name = "swin_tiny_patch4_window7_224" if version == 1 else "swinv2_tiny_window8_256"
    return timm.create_model(
        name, pretrained=False, img_size=img, window_size=window, num_classes=NUM_CLASSES, drop_path_rate=0.0, **SMALL
    )


def torchvision_model(version: int, window: int):
    from torchvision.models import swin_transformer as tv

    extra = dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2) if version == 2 else {}
    return tv.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=SMALL["embed_dim"],
        depths=list(SMALL["depths"]),
        num_heads=list(SMALL["num_heads"]),
        window_size=[window, window],
        stochastic_depth_prob=0.0,
        num_classes=NUM_CLASSES,
        **extra,
    )


def hf_model(version: int, img, window: int):
    import transformers

    cls_cfg, cls = (
        (transformers.SwinConfig, transformers.SwinForImageClassification)
        if version == 1
        else (transformers.Swinv2Config, transformers.Swinv2ForImageClassification)
    )
    config = cls_cfg(
        image_size=img,
        patch_size=4,
        embed_dim=SMALL["embed_dim"],
        depths=list(SMALL["depths"]),
        num_heads=list(SMALL["num_heads"]),
        window_size=window,
        num_labels=NUM_CLASSES,
        drop_path_rate=0.0,
    )
    return cls(config)


def peer_logits(peer, x):
    out = peer(x)
    return out.logits if hasattr(out, "logits") else out


def ours(version: int, window: int, img) -> swinx.SwinTransformer:
    return swinx.create_model(
        "swin_t" if version == 1 else "swinv2_t",
        window_size=window,
        img_size=img,
        num_classes=NUM_CLASSES,
        drop_path_rate=0.0,
        **SMALL,
    )


# (peer, version, window, input (H, W), size the peer is built for)
CASES = [
    ("timm", 1, 7, (224, 224), 224),
    ("timm", 1, 7, (448, 448), 448),
    ("timm", 2, 8, (256, 256), 256),
    ("timm", 2, 7, (448, 448), 448),
    ("torchvision", 1, 7, (224, 224), 224),
    ("torchvision", 1, 7, (200, 312), 224),
    ("torchvision", 2, 8, (224, 224), 224),
    ("torchvision", 2, 8, (200, 312), 224),
    ("hf", 1, 7, (224, 224), 224),
    ("hf", 1, 7, (200, 312), 224),
    ("hf", 2, 8, (224, 224), 224),
    ("hf", 2, 8, (256, 256), 256),
    # Hugging Face's V2 fixes each block's window and shift when it is built, from
    # config.image_size with floor division; sizes where that agrees with the actual maps:
    ("hf", 2, 8, (288, 416), (288, 416)),
]


def build_peer(kind, version, window, built_for):
    if kind == "timm":
        return timm_model(version, built_for, window)
    if kind == "torchvision":
        return torchvision_model(version, window)
    return hf_model(version, built_for, window)


@pytest.mark.parametrize("kind,version,window,size,built_for", CASES, ids=lambda v: str(v))
def test_peer_checkpoint_loads_and_matches(kind, version, window, size, built_for):
    peer = randomize(build_peer(kind, version, window, built_for), seed=1).eval()
    model = ours(version, window, built_for).eval()
    report = swinx.load_checkpoint(model, peer.state_dict())
    assert report.layout == kind
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = peer_logits(peer, x), model(x)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero outputs
    assert max_diff(got, expected) < TOL


@pytest.mark.parametrize("kind,version,window,size,built_for", CASES, ids=lambda v: str(v))
def test_export_loads_strictly_into_peer(kind, version, window, size, built_for):
    model = randomize(ours(version, window, built_for), seed=2).eval()
    if kind == "torchvision":
        model.small_map = "pad"
    peer = build_peer(kind, version, window, built_for).eval()
    peer.load_state_dict(swinx.export_state_dict(model, kind), strict=True)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_diff(peer_logits(peer, x), model(x)) < TOL
