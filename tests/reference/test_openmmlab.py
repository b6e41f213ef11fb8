"""OpenMMLab's own outputs (tests/fixtures/openmmlab, copied from shared/fixtures): mmpretrain 1.2.0's Swin V1 / V2
backbones, their checkpoints as mmengine saves them, and the layout in both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import swinx
from helpers import SMALL, max_diff, randomize
from swinx.cli import main
from swinx.weights import layouts

FIXTURES = Path(__file__).parent.parent / "fixtures" / "openmmlab"
CASES = json.loads((FIXTURES / "cases.json").read_text())


def mm_backbone(io: dict, **kwargs) -> swinx.SwinBackbone:
    """Our backbone for mmpretrain constructor arguments. mmpretrain's default pad_small_map=False equals our
    clamp rule wherever it runs (a map equal to the window drops the shift, a smaller one is an error);
    pad_small_map=True (and mmdetection's Swin) is pad_shift."""
    args = io["mm_args"]
    arch = args["arch"]
    assert not arch.get("extra_norm_every_n_blocks")
    settings = dict(
        embed_dim=arch["embed_dims"],
        depths=arch["depths"],
        num_heads=arch["num_heads"],
        window_size=args["window_size"],
        img_size=args["img_size"],
        drop_path_rate=0.0,
        small_map="pad_shift" if args.get("pad_small_map") else "clamp",
    )
    return swinx.create_backbone("swin_t" if io["kind"] == "v1" else "swinv2_t", **{**settings, **kwargs}).eval()


def load_case(name: str, **kwargs):
    io = torch.load(FIXTURES / f"{name}.io.pt", weights_only=True)
    model = mm_backbone(io, **kwargs)
    report = swinx.load_checkpoint(model, FIXTURES / f"{name}.pth")
    return model, io, report


def fixture_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{name}.pth", weights_only=True)["state_dict"]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "exact"])
def test_backbone_reproduces_all_four_outputs(name, fused):
    model, io, report = load_case(name)
    assert report.layout == "openmmlab" and report.fresh == [] and report.dropped == [] and report.skipped == []
    assert report.ignored_buffers and report.head.startswith("none")
    assert sum(p.numel() for p in model.parameters()) == CASES[name]["params"]
    model.set_fused_attn(fused)
    with torch.no_grad():
        out = model(io["input"])
    assert list(out) == ["0", "1", "2", "3"]
    for i, theirs in enumerate(io["outputs"]):
        assert list(out[str(i)].shape) == CASES[name]["output_shapes"][i]
        assert max_diff(out[str(i)], theirs) < 1e-4, i


def test_the_channel_permutation_and_the_small_map_rule_matter():
    """Two controls that make the match above mean something. Without the nn.Unfold channel order, every stage
    after the first merging is wrong. With pad_shift instead of mmpretrain's default, only stage 4 changes:
    its 7x10 map equals the window on its short side, where mmpretrain (and clamp) drop the shift."""
    io = torch.load(FIXTURES / "mm_v1_w7.io.pt", weights_only=True)
    identity = dict(fixture_state("mm_v1_w7"))
    for key in [k for k in identity if ".downsample." in k]:
        # Pre-permuted so that the loader's un-permutation gives back mm's raw channel order: the model then
        # reads mm's Unfold-ordered merging weights as if they were in our order.
        piece = layouts.Piece(key, unfold_dim=1 if key.endswith("reduction.weight") else 0)
        identity[key] = layouts.to_peer(identity[key], piece)
    plain = mm_backbone(io)
    swinx.load_checkpoint(plain, identity)
    shifted = mm_backbone(io, small_map="pad_shift")
    swinx.load_checkpoint(shifted, FIXTURES / "mm_v1_w7.pth")
    with torch.no_grad():
        wrong, other = plain(io["input"]), shifted(io["input"])
    assert max_diff(wrong["0"], io["outputs"][0]) < 1e-4
    assert all(max_diff(wrong[str(i)], io["outputs"][i]) > 1e-2 for i in (1, 2, 3))
    assert all(max_diff(other[str(i)], io["outputs"][i]) < 1e-4 for i in (0, 1, 2))
    assert max_diff(other["3"], io["outputs"][3]) > 1e-2


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_reproduces_the_checkpoint_tensor_for_tensor(name):
    """export_state_dict(backbone, "openmmlab") is the mm model's state dict, `backbone.` prefix and the index
    (and V2 coordinate) buffers included: exactly what mmengine saved under "state_dict"."""
    model, _, _ = load_case(name)
    exported = swinx.export_state_dict(model, "openmmlab")
    theirs = fixture_state(name)
    assert exported.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_detect_and_infer_the_architecture(name):
    io = torch.load(FIXTURES / f"{name}.io.pt", weights_only=True)
    state = fixture_state(name)
    assert layouts.detect_layout(state, wrapped=True) == "openmmlab"
    config = layouts.infer_config(state, "openmmlab")
    want = mm_backbone(io).config
    for field in ("version", "embed_dim", "depths", "num_heads", "window_size", "patch_size", "qkv_bias", "ape"):
        assert getattr(config, field) == getattr(want, field), field
    assert config.num_classes == 0
    # A bare backbone state dict (mm's `model.backbone.state_dict()`) loads the same.
    bare = {k.removeprefix("backbone."): v for k, v in state.items()}
    model = mm_backbone(io)
    assert swinx.load_checkpoint(model, bare).layout == "openmmlab"
    with torch.no_grad():
        assert max_diff(model(io["input"])["3"], io["outputs"][3]) < 1e-4


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_round_trips_are_exact(version):
    """Ours -> openmmlab -> ours, classifiers (head.fc, final norm as backbone.norm3) and backbones, every
    parameter randomised."""
    name = "swin_t" if version == 1 else "swinv2_t"
    source = randomize(swinx.create_model(name, **SMALL, num_classes=5, ape=True, img_size=64), seed=1).eval()
    exported = swinx.export_state_dict(source, "openmmlab")
    assert {"head.fc.weight", "head.fc.bias", "backbone.norm3.weight", "backbone.absolute_pos_embed"} <= exported.keys()
    assert all(k.startswith(("backbone.", "head.fc.")) for k in exported)
    target = randomize(swinx.create_model(name, **SMALL, num_classes=5, ape=True, img_size=64), seed=2)
    report = swinx.load_checkpoint(target, {"meta": {}, "state_dict": exported})
    assert report.layout == "openmmlab" and report.head == "loaded"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())

    bb = randomize(swinx.create_backbone(name, **SMALL), seed=3)
    again = randomize(swinx.create_backbone(name, **SMALL), seed=4)
    swinx.load_checkpoint(again, swinx.export_state_dict(bb, "openmmlab"))
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("name", sorted(CASES))
def test_classifier_loads_an_mmpretrain_classifier(name):
    """mmpretrain's ImageClassifier: the backbone with out_indices=(3,) (norm3 only), global average pooling,
    LinearClsHead (`head.fc`). Our classifier's logits are the head on the pooled fixture output 3."""
    io = torch.load(FIXTURES / f"{name}.io.pt", weights_only=True)
    state = {
        k: v
        for k, v in fixture_state(name).items()
        if not k.startswith(("backbone.norm0", "backbone.norm1", "backbone.norm2"))
    }
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(5, 128, generator=g) / 128**0.5, torch.randn(5, generator=g)
    state.update({"head.fc.weight": weight, "head.fc.bias": bias})
    config = mm_backbone(io).config.replace(num_classes=5)
    model = swinx.SwinTransformer(config).eval()
    report = swinx.load_checkpoint(model, {"meta": {}, "state_dict": state})
    assert report.layout == "openmmlab" and report.head == "loaded" and report.dropped == []
    with torch.no_grad():
        logits = model(io["input"])
    assert max_diff(logits, io["outputs"][3].mean((2, 3)) @ weight.T + bias) < 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_detector_checkpoint_skips_neck_and_heads(name):
    """A whole detector / segmenter file: the backbone loads, neck and heads are skipped and reported; a
    classifier takes norm3 as its final norm and drops the other output norms."""
    io = torch.load(FIXTURES / f"{name}.io.pt", weights_only=True)
    state = dict(fixture_state(name))
    extra = {
        "neck.fpn_convs.0.conv.weight": torch.zeros(8, 8, 3, 3),
        "rpn_head.rpn_reg.weight": torch.zeros(12, 8),
        "roi_head.mask_head.conv_logits.bias": torch.zeros(80),
        "decode_head.conv_seg.weight": torch.zeros(2),
        "auxiliary_head.conv_seg.bias": torch.zeros(2),
    }
    state.update(extra)
    model = mm_backbone(io)
    report = swinx.load_checkpoint(model, {"meta": {}, "state_dict": state})
    assert report.skipped == sorted(extra) and report.fresh == []
    with torch.no_grad():
        assert max_diff(model(io["input"])["2"], io["outputs"][2]) < 1e-4
    classifier = swinx.SwinTransformer(mm_backbone(io).config).eval()  # num_classes 0: pooled features
    report = swinx.load_checkpoint(classifier, {"meta": {}, "state_dict": state})
    assert sorted(report.dropped) == sorted(f"backbone.norm{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    with torch.no_grad():
        assert max_diff(classifier(io["input"]), io["outputs"][3].mean((2, 3))) < 1e-4


def test_convert_to_and_from_openmmlab(tmp_path, capsys):
    """`swinx convert --to openmmlab` writes what mmengine saves ({"meta", "state_dict"}, keys under
    `backbone.`); an mm backbone file converts to our format as a backbone, norms and all."""
    source = randomize(swinx.create_model("swinv2_t", **SMALL, num_classes=4), seed=1).eval()
    swinx.save_model(source, tmp_path / "ours.safetensors")
    out = tmp_path / "mm.pth"
    assert main(["convert", str(tmp_path / "ours.safetensors"), str(out), "--to", "openmmlab"]) == 0
    assert "openmmlab layout, 4 classes" in capsys.readouterr().out
    written = torch.load(out, weights_only=True)
    assert set(written) == {"meta", "state_dict"}
    want = swinx.export_state_dict(source, "openmmlab")
    assert written["state_dict"].keys() == want.keys()
    assert all(torch.equal(written["state_dict"][k], v) for k, v in want.items())

    ours = tmp_path / "bb.safetensors"
    assert main(["convert", str(FIXTURES / "mm_v1_w7.pth"), str(ours), "--to", "swinx"]) == 0
    assert "backbone, outputs [0, 1, 2, 3]" in capsys.readouterr().out
    back = swinx.load_model(ours).eval()
    io = torch.load(FIXTURES / "mm_v1_w7.io.pt", weights_only=True)
    assert isinstance(back, swinx.SwinBackbone)
    with torch.no_grad():
        out = back(io["input"])
    assert all(max_diff(out[str(i)], io["outputs"][i]) < 1e-4 for i in range(4))
