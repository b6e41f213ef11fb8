"""The dense backbone: outputs, parameter names, loading every layout, frozen stages, norm_eval, compile, FPN."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch._dynamo
from torch import nn

import swinx
from helpers import SMALL, max_diff, one_thread, randomize  # noqa: F401  (one_thread is a fixture)
from swinx import CheckpointError, create_backbone, export_state_dict, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
NAME = {1: "swin_t", 2: "swinv2_t"}


def classifier(version: int, seed: int = 0, **overrides) -> swinx.SwinTransformer:
    model = swinx.create_model(NAME[version], **{**SMALL, "num_classes": 7, **overrides})
    return randomize(model, seed).eval()


def backbone(version: int, seed: int | None = 0, **kwargs) -> swinx.SwinBackbone:
    model = create_backbone(NAME[version], **{**SMALL, **kwargs})
    return (randomize(model, seed) if seed is not None else model).eval()


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def intermediates_with_norms(model: swinx.SwinTransformer, x: torch.Tensor, norms: dict[int, nn.LayerNorm]):
    """The reference: the classifier's stage maps (B, C_i, H_i, W_i), each through its output norm."""
    maps = model.forward_intermediates(x)
    return {i: norm(maps[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for i, norm in norms.items()}


# ----- 1. outputs -------------------------------------------------------------------------------------
@VERSIONS
@pytest.mark.parametrize("size", [(100, 156), (72, 200)])
def test_backbone_is_forward_intermediates_plus_norms(version, size):
    """Same weights: output i is the classifier's stage-i map (before merging) after norm{i}, at rectangular
    sizes that need padding at every stage."""
    source = classifier(version, seed=1)
    model = backbone(version, seed=2)
    report = load_checkpoint(model, source.state_dict())
    assert report.fresh == [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    randomize(nn.ModuleList(getattr(model, f"norm{i}") for i in range(4)), seed=3)  # non-trivial output norms
    x = images(2, 3, *size)
    with torch.no_grad():
        out = model(x)
        want = intermediates_with_norms(source, x, {i: getattr(model, f"norm{i}") for i in range(4)})
    assert isinstance(out, OrderedDict) and list(out) == ["0", "1", "2", "3"]
    for i in range(4):
        H, W = -(-size[0] // (4 * 2**i)), -(-size[1] // (4 * 2**i))
        assert out[str(i)].shape == (2, 32 * 2**i, H, W) and out[str(i)].is_contiguous()
        assert max_diff(out[str(i)], want[i]) < 1e-6, i
    assert model.channels == [32, 64, 128, 256] and model.strides == [4, 8, 16, 32]
    assert model.out_indices == (0, 1, 2, 3) and not hasattr(model, "out_channels")  # the FPN wrapper sets that


def test_out_indices_subset_and_negative():
    model = backbone(1, out_indices=(-1, 1))
    assert model.out_indices == (1, 3) and model.channels == [64, 256] and model.strides == [8, 32]
    assert {n.split(".")[0] for n, _ in model.named_parameters() if n.startswith("norm")} == {"norm1", "norm3"}
    out = model(images(1, 3, 64, 96))
    assert list(out) == ["1", "3"] and out["3"].shape == (1, 256, 2, 3)
    # Stages after the last output are built (checkpoints load strictly) but not run.
    short = backbone(1, out_indices=(0, 1))
    ran = []
    for i, stage in enumerate(short.layers):
        stage.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    short(images(1, 3, 64, 96))
    assert ran == [0, 1] and len(short.layers) == 4
    for bad in [(4,), (), (-5,)]:
        with pytest.raises(ValueError, match="out_indices"):
            backbone(1, out_indices=bad)
    with pytest.raises(ValueError, match="frozen_stages"):
        backbone(1, frozen_stages=5)
    with pytest.raises(TypeError, match="no classifier"):
        create_backbone("swin_t", num_classes=10)


@VERSIONS
def test_parameter_names_are_the_classifiers_plus_output_norms(version):
    ours = set(backbone(version, ape=True).state_dict())
    theirs = set(classifier(version, ape=True).state_dict())
    norms = {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert ours == (theirs - {"norm.weight", "norm.bias", "head.weight", "head.bias"}) | norms
    assert "absolute_pos_embed" in ours


# ----- 2. loading ---------------------------------------------------------------------------------------
@VERSIONS
@pytest.mark.parametrize("layout", swinx.LAYOUTS)
def test_any_classification_checkpoint_loads(version, layout):
    """Every layout's classifier export loads into a backbone: head and final norm dropped and reported, the
    output norms left as initialised (LayerNorm: 1 and 0), everything else the classifier's own weights.
    OpenMMLab names a classifier's final norm `backbone.norm3`, its backbone's one output norm: that one
    loads into norm3, as mmdetection loads it."""
    source = classifier(version, seed=4)
    model = backbone(version, seed=None)
    report = load_checkpoint(model, export_state_dict(source, layout))
    mm = layout == "openmmlab"
    assert report.head.startswith("head dropped"), report.head
    assert sum(k.startswith(("head.", "classifier.")) for k in report.dropped) == 2
    assert len(report.dropped) == (2 if mm else 4)  # head weight, bias and the final norm's weight, bias
    fresh = range(3) if mm else range(4)
    assert report.fresh == [f"norm{i}.{p}" for i in fresh for p in ("weight", "bias")]
    assert "head dropped" in str(report) and ("norm0, norm1, norm2" + ("" if mm else ", norm3")) in str(report)
    for i in fresh:
        norm = getattr(model, f"norm{i}")
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    if mm:
        assert torch.equal(model.norm3.weight, source.norm.weight) and torch.equal(model.norm3.bias, source.norm.bias)
    trunk = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "norm."))}
    for key, value in trunk.items():
        assert torch.equal(model.state_dict()[key], value), key
    if layout == "torchvision":
        assert model.small_map == "pad" and report.small_map == "pad"
        source.small_map = "pad"
    x = images(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        want = intermediates_with_norms(source, x, {i: getattr(model, f"norm{i}") for i in range(4)})
    assert all(max_diff(out[str(i)], want[i]) < 1e-6 for i in range(4))


def test_loading_resizes_tables_and_position_embedding():
    source = classifier(1, seed=1, window_size=7, ape=True, img_size=64)
    model = backbone(1, seed=2, window_size=8, ape=True, img_size=96)
    report = load_checkpoint(model, export_state_dict(source, "official"))
    assert "absolute_pos_embed" in report.resized
    assert sum("relative_position_bias_table window 7 -> 8" in r for r in report.resized) == 8
    assert model.absolute_pos_embed.shape == (1, 24 * 24, 32)


@VERSIONS
def test_another_variant_is_an_error_naming_what_differs(version):
    model = backbone(version, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, classifier(version, embed_dim=48).state_dict())
    msg = str(info.value)
    assert "shapes differ" in msg and "(144, 48)" in msg and "embed_dim 48" in msg and "a backbone" in msg
    state = dict(classifier(version).state_dict())
    del state["layers.2.blocks.1.mlp.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: layers\.2\.blocks\.1\.mlp\.fc2\.weight"):
        load_checkpoint(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_official_detection_checkpoint_loads_with_its_output_norms():
    """The official detection repo: official names under `backbone.`, norm0..3, beside neck and heads."""
    source = backbone(1, seed=6)
    state = {
        "backbone." + k: v
        for k, v in export_state_dict(classifier(1, seed=6), "official").items()
        if not k.startswith(("head.", "norm."))
    }
    state.update({f"backbone.{k}": v for k, v in source.state_dict().items() if k.startswith("norm")})
    state.update(
        {
            "neck.lateral_convs.0.conv.weight": torch.zeros(4, 32, 1, 1),
            "rpn_head.rpn_cls.bias": torch.zeros(3),
            "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 16),
        }
    )
    model = backbone(1, seed=7)
    report = load_checkpoint(model, {"meta": {"epoch": 12}, "state_dict": state})
    assert report.layout == "official" and report.fresh == [] and report.head.startswith("none")
    assert report.skipped == [
        "neck.lateral_convs.0.conv.weight",
        "roi_head.bbox_head.fc_cls.weight",
        "rpn_head.rpn_cls.bias",
    ]
    assert "skipped 3 tensors of the source's other parts (neck, roi_head, rpn_head)" in str(report)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    # A classifier takes the last output norm as its final norm and drops the others.
    target = classifier(1, seed=8)
    report = load_checkpoint(target, {"meta": {}, "state_dict": state})
    assert report.head.startswith("kept") and any("norm3" in n for n in report.notes)
    assert sorted(report.dropped) == sorted(f"norm{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    assert torch.equal(target.norm.weight, source.norm3.weight)


def test_save_and_load_model_rebuild_the_backbone(tmp_path):
    model = backbone(2, seed=1, out_indices=(1, 2, 3), frozen_stages=1)
    swinx.save_model(model, tmp_path / "b.safetensors")
    back = swinx.load_model(tmp_path / "b.safetensors")
    assert isinstance(back, swinx.SwinBackbone) and back.out_indices == (1, 2, 3) and back.frozen_stages == 1
    x = images(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(back.eval()(x).values(), model(x).values()))
    with pytest.raises(ValueError, match="no output norms"):
        export_state_dict(model, "timm")


# ----- 3. frozen stages, norm_eval ---------------------------------------------------------------------
def train_steps(model: nn.Module, steps: int = 3) -> None:
    """A few AdamW steps on a loss that reaches every output (and so every parameter)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen parameters get no gradient: skipped
    model.train()
    for step in range(steps):
        out = model(images(2, 3, 64, 96, seed=step))
        loss = sum((o - 0.5).pow(2).mean() for o in out.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("version,frozen", [(1, 0), (1, 2), (2, 1)])
def test_frozen_stages_stay_bit_identical_through_training(version, frozen):
    """mmdetection's semantics: 0 freezes the patch embedding (and ape); k >= 1 also stages 0..k-1 with
    their patch merging (for V2 too: ours sits at the end of a stage) and norm0..norm{k-1}."""
    model = backbone(version, seed=1, frozen_stages=frozen, ape=True, img_size=64, drop_path_rate=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_prefixes = (
        "patch_embed.",
        "absolute_pos_embed",
        *(f"layers.{i}." for i in range(frozen)),
        *(f"norm{i}." for i in range(frozen)),
    )
    train_steps(model)
    for name, p in model.named_parameters():
        is_frozen = name.startswith(frozen_prefixes)
        assert p.requires_grad != is_frozen, name
        assert torch.equal(p, before[name]) == is_frozen, name
    # Frozen modules stay in eval mode after train(): no stochastic depth in frozen stages.
    assert not model.patch_embed.training and not model.pos_drop.training
    assert all(not model.layers[i].training for i in range(frozen)) and model.layers[frozen].training
    if frozen:
        assert not model.layers[frozen - 1].downsample.training and not getattr(model, f"norm{frozen - 1}").training


def test_norm_eval_acts_on_running_statistics_only():
    """LayerNorm computes the same in train and eval mode: for the Swin, norm_eval changes nothing; a
    BatchNorm added to the module is kept in eval mode (its running statistics frozen)."""
    plain, kept = backbone(1, seed=1, drop_path_rate=0.0), backbone(1, seed=1, drop_path_rate=0.0, norm_eval=True)
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain.train()(x).values(), kept.train()(x).values()))
    for model in (plain, kept):
        model.extra = nn.BatchNorm2d(3)
        model.train()
    assert plain.extra.training and not kept.extra.training
    assert kept.layers[0].training  # the rest trains as usual


def test_grad_checkpointing_no_weight_decay_and_small_map():
    model = backbone(2, seed=1, drop_path_rate=0.0)
    x = images(1, 3, 64, 96)
    losses, grads = [], []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        loss = sum(o.square().mean() for o in model.train()(x).values())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    assert all(max_diff(grads[0][n], grads[1][n]) < 1e-6 for n in grads[0])
    decay_free = model.no_weight_decay()
    assert {"norm0.weight", "norm3.bias", "layers.0.blocks.0.attn.logit_scale"} <= decay_free
    assert "layers.0.blocks.0.attn.qkv.weight" not in decay_free
    assert model.small_map == "clamp"
    padded = backbone(1, small_map="pad_shift")
    assert padded.small_map == "pad_shift" and all(b.small_map == "pad_shift" for b in padded.blocks())


# ----- 4. with torchvision and torch.compile --------------------------------------------------------------
def test_feeds_torchvisions_feature_pyramid():
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    model = backbone(1, seed=1)
    fpn = FeaturePyramidNetwork(model.channels, 16, extra_blocks=LastLevelMaxPool())
    with torch.no_grad():
        levels = fpn(model(images(2, 3, 96, 128)))
    assert [tuple(v.shape) for v in levels.values()] == [
        (2, 16, 24, 32),
        (2, 16, 12, 16),
        (2, 16, 6, 8),
        (2, 16, 3, 4),
        (2, 16, 2, 2),
    ]


@pytest.mark.slow
def test_pad_shift_backbone_under_dynamic_compile():
    """A detector sees every image size. Compiled with dynamic shapes, a pad_shift backbone agrees with eager
    at every size, the ones whose last maps are padded to a single window included; sizes with at least two
    windows a side share one graph. (A one-window axis is a size-1 dimension, on which dynamo specialises:
    those sizes get their own graph, as under the clamp rule.)"""
    torch._dynamo.reset()
    model = backbone(1, seed=1, small_map="pad_shift")
    compiled = torch.compile(model, dynamic=True, backend="eager", fullgraph=True)

    def check(batch, h, w):
        x = images(batch, 3, h, w, seed=h + w)
        got, want = compiled(x), model(x)
        assert all(max_diff(got[k], want[k]) < 1e-4 for k in want), (h, w)

    try:
        with torch.inference_mode():
            check(2, 288, 320)
            with torch._dynamo.config.patch(error_on_recompile=True):
                for size in [(3, 320, 256), (4, 480, 352)]:  # batch 1 would specialise too
                    check(*size)
            check(2, 100, 156)  # stage maps 25x39 ... 4x5: the last one padded to one window, shift kept
    finally:
        torch._dynamo.reset()
