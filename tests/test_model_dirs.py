"""`swinx convert IN OUT --to hf|timm` model directories: transformers' and timm's own loaders read them
and reproduce our logits; read_model_dir reads them back; what may not be overwritten is not."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import swinx
from helpers import max_diff, one_thread, randomize  # noqa: F401 - one_thread is used through pytestmark
from swinx.cli import main
from swinx.weights import model_dirs
from swinx.weights.directories import read_model_dir
from swinx.weights.model_dirs import timm_architecture, timm_names, write_hf_dir, write_timm_dir

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
NAMES = ["cat", "dog", "owl", "fox", "elk"]
# (variant, overrides, another input size transformers runs like us: V1 sets its windows from the real
# maps; V2 fixes them from config.image_size, so the last stage keeps a map of at most one window)
TINY = {
    1: ("swin_t", dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7, img_size=56), (72, 100)),
    2: ("swinv2_t", dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4, img_size=64), (64, 96)),
}
SPEC = {  # preprocessing unlike the defaults, so that a default cannot pass for it
    "img_size": 64,
    "channels": 3,
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
    "crop_pct": 0.82,  # resize to 78, crop 64: not 64 / 0.82 exactly, and an even margin (see below)
    "interpolation": "bilinear",
}
VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])


def tiny(version: int, seed: int = 0, **overrides) -> swinx.SwinTransformer:
    name, config, _ = TINY[version]
    model = swinx.create_model(name, **{**config, "num_classes": 5, "drop_path_rate": 0.0, **overrides})
    return randomize(model, seed).eval()  # every parameter (the model has no persistent buffers)


def image(size, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def source(tmp_path, model, spec=None, names=NAMES):
    """A swinx safetensors with class names and (optionally) its preprocessing, as training writes it."""
    path = tmp_path / "model.safetensors"
    swinx.save_model(model, path, class_names=names, extra_metadata={"input": json.dumps(spec)} if spec else None)
    return path


def convert(src, out, to, *extra) -> int:
    return main(["convert", str(src), str(out), "--to", to, *extra])


def peer_logits(peer, x):
    out = peer(x)
    return out.logits if hasattr(out, "logits") else out


# ----- transformers ------------------------------------------------------------------------------
@VERSIONS
def test_hf_dir_loads_in_transformers_and_matches(tmp_path, capsys, version):
    transformers = pytest.importorskip("transformers")
    model = tiny(version, seed=1)
    out = tmp_path / "hf"
    assert convert(source(tmp_path, model, SPEC), out, "hf") == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/" in printed and "preprocessor_config.json" in printed and "its own preprocessing" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    peer, info = transformers.AutoModelForImageClassification.from_pretrained(out, output_loading_info=True)
    assert type(peer).__name__ == ("SwinForImageClassification" if version == 1 else "Swinv2ForImageClassification")
    assert not any(info.values()), info  # no missing, unexpected or misshapen keys
    assert peer.config.id2label == dict(enumerate(NAMES))
    for size in (model.config.img_hw, TINY[version][2]):
        # a fresh peer for each size: transformers' V1 block keeps shift 0 for good once it has run a map of at
        # most one window (stage 2 at 56x56), so it would compute 72x100 unshifted after it
        peer = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
        x = image(size)
        with torch.no_grad():
            expected, got = model(x), peer_logits(peer, x)
        assert expected.abs().max() > 0.1
        assert max_diff(got, expected) < TOL, size

    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == SPEC["mean"] and list(processor.image_std) == SPEC["std"]
    assert processor.crop_size["height"] == processor.crop_size["width"] == SPEC["img_size"]
    assert processor.size["shortest_edge"] == round(SPEC["img_size"] / SPEC["crop_pct"])
    # ... and it preprocesses as our validation transform does (with an odd margin, size - crop, transformers
    # would crop one pixel nearer the top left: it floors half the margin, torchvision rounds it)
    from swinx.classification.inference import transform_for_spec

    picture = Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 130, 3), dtype=np.uint8))
    theirs = processor(picture, return_tensors="pt")["pixel_values"][0]
    assert max_diff(theirs, transform_for_spec(SPEC)(picture)) < 1e-3


def test_hf_dir_carries_the_hub_key_names(tmp_path):
    model = tiny(1)
    write_hf_dir(model, tmp_path / "hf")
    keys = load_file(tmp_path / "hf" / "model.safetensors")
    assert "swin.encoder.layers.0.blocks.0.attention.self.query.weight" in keys  # what save_pretrained writes
    assert set(keys) == set(swinx.export_state_dict(model, "hf-hub"))
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert meta["id2label"] == {str(i): f"class {i}" for i in range(5)}  # no names given: "class i"
    assert meta["model_type"] == "swin" and meta["architectures"] == ["SwinForImageClassification"]
    assert meta["layer_norm_eps"] == 1e-5 and meta["hidden_act"] == "gelu" and meta["hidden_size"] == 32


@VERSIONS
def test_headless_dirs_load_as_base_models(tmp_path, version):
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    model = tiny(version, seed=3, num_classes=0)
    x = image(model.config.img_hw, seed=1)
    with torch.no_grad():
        expected = model(x)  # pooled features
    write_hf_dir(model, tmp_path / "hf")
    peer, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(peer).__name__ == ("SwinModel" if version == 1 else "Swinv2Model") and not any(info.values())
    with torch.no_grad():
        assert max_diff(peer.eval()(x).pooler_output, expected) < TOL
    write_timm_dir(model, tmp_path / "timm")
    peer = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert max_diff(peer(x), expected) < TOL


# ----- timm ------------------------------------------------------------------------------------------
@VERSIONS
def test_timm_dir_loads_in_timm_and_matches(tmp_path, capsys, version):
    timm = pytest.importorskip("timm")
    model = tiny(version, seed=2)
    out = tmp_path / "timm"
    assert convert(source(tmp_path, model, SPEC), out, "timm") == 0
    assert f"wrote {out}/" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())

    x = image(model.config.img_hw)
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.1
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert local.pretrained_cfg["label_names"] == NAMES
    assert list(local.pretrained_cfg["mean"]) == SPEC["mean"] and local.pretrained_cfg["crop_pct"] == SPEC["crop_pct"]
    # The named architecture with the written arguments; the overlay needs the class count (else timm drops the
    # head as belonging to another one).
    overlay = dict(file=str(out / "model.safetensors"), num_classes=meta["num_classes"])
    named = timm.create_model(
        meta["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **meta["model_args"]
    )
    for peer in (local, named.eval()):
        with torch.no_grad():
            assert max_diff(peer(x), expected) < TOL


def test_timm_names_and_their_configs_are_timms():
    timm = pytest.importorskip("timm")
    theirs = {n for n in timm.list_models("swin*") if not n.startswith(("swin_s3", "swinv2_cr"))}
    assert set(timm_names(1)) | set(timm_names(2)) == theirs
    # what we write into model_args is what differs from our config of the name: it must be timm's config
    for name in sorted(theirs):
        ours = swinx.get_config(name)
        with torch.device("meta"):
            peer = timm.create_model(name, pretrained=False)
        blocks = [stage.blocks for stage in peer.layers]
        assert peer.patch_embed.img_size == ours.img_hw, name
        assert peer.patch_embed.proj.out_channels == ours.embed_dim, name
        assert tuple(len(b) for b in blocks) == ours.depths, name
        assert tuple(b[0].attn.num_heads for b in blocks) == ours.num_heads, name
        assert tuple(blocks[0][0].attn.window_size) == (ours.window_size,) * 2, name  # stage 1: never clamped
        assert peer.num_classes == ours.num_classes, name
        if ours.version == 2:
            assert tuple(b[0].attn.pretrained_window_size[0] for b in blocks) == ours.pretrained_window_sizes, name


@pytest.mark.parametrize(
    "variant,overrides,expected",
    [
        ("swin_t", dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), img_size=56), "swin_tiny_patch4_window7_224"),
        ("swin_b", dict(img_size=384, window_size=12), "swin_base_patch4_window12_384"),
        ("swin_s", dict(num_classes=10), "swin_small_patch4_window7_224"),
        ("swinv2_t", dict(window_size=16), "swinv2_tiny_window16_256"),
        ("swinv2_l", {}, "swinv2_large_window12to24_192to384"),
    ],
)
def test_timm_architecture_is_the_closest_name(variant, overrides, expected):
    assert timm_architecture(swinx.get_config(variant, **overrides)) == expected


# ----- read back -------------------------------------------------------------------------------------
@VERSIONS
@pytest.mark.parametrize("to", ["hf", "timm"])
def test_read_model_dir_round_trip(tmp_path, version, to):
    model = tiny(version, seed=4, drop_path_rate=0.2, mlp_ratio=2.0)
    out = tmp_path / to
    assert convert(source(tmp_path, model, SPEC), out, to) == 0
    back = read_model_dir(out)
    assert back.config == model.config  # every field: the architecture, the rates, small_map "clamp"
    assert back.class_names == NAMES
    assert back.origin == ("transformers" if to == "hf" else "timm")
    spec = dict(back.preprocessing)
    if to == "hf":  # transformers keeps the resize size, not crop_pct: the same transform
        assert round(spec["img_size"] / spec.pop("crop_pct")) == round(SPEC["img_size"] / SPEC["crop_pct"])
        assert spec == {k: v for k, v in SPEC.items() if k != "crop_pct"}
    else:
        assert spec == SPEC
    loaded = swinx.SwinTransformer(back.config).eval()
    swinx.load_checkpoint(loaded, back.state, layout=back.layout)
    x = image(model.config.img_hw)
    with torch.no_grad():
        assert max_diff(loaded(x), model(x)) < 1e-5


@pytest.mark.parametrize("to", ["hf", "timm"])
def test_no_preprocessing_gives_the_default_spec(tmp_path, capsys, to):
    from swinx.classification.inference import default_input_spec

    model = tiny(1)
    assert convert(source(tmp_path, model, names=None), tmp_path / to, to) == 0
    assert "the default preprocessing" in capsys.readouterr().out
    back = read_model_dir(tmp_path / to)
    assert back.preprocessing == default_input_spec(model.config)  # 56 / 0.875 = 64: exact
    assert back.class_names == ([f"class {i}" for i in range(5)] if to == "hf" else None)


# ----- single files as before ----------------------------------------------------------------------
@pytest.mark.parametrize("to,name", [("hf", "out.safetensors"), ("hf", "pytorch_model.bin"), ("timm", "m.pth")])
def test_file_suffix_still_writes_one_file(tmp_path, capsys, to, name):
    model = tiny(2)
    assert convert(source(tmp_path, model), tmp_path / name, to) == 0
    assert (tmp_path / name).is_file()
    back = swinx.SwinTransformer(model.config).eval()
    report = swinx.load_checkpoint(back, tmp_path / name)
    assert report.layout == to
    assert torch.equal(back.head.weight, model.head.weight)


# ----- what is refused ---------------------------------------------------------------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("swinx convert: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("to", ["hf", "timm"])
def test_unrelated_directory_is_not_touched(tmp_path, capsys, to):
    src = source(tmp_path, tiny(1))
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text("{}")
    assert convert(src, out, to) == 2
    assert "did not write" in _one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "precious"]  # no temporaries left
    # --overwrite replaces it
    assert convert(src, out, to, "--overwrite") == 0
    assert not (out / "notes.txt").exists() and read_model_dir(out).class_names == NAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "precious"]


def test_existing_file_without_suffix_is_not_touched(tmp_path, capsys):
    out = tmp_path / "weights"
    out.write_text("data")
    assert convert(source(tmp_path, tiny(1)), out, "hf") == 2
    assert "is a file" in _one_line_error(capsys) and out.read_text() == "data"


@pytest.mark.parametrize("to", ["hf", "timm"])
def test_previous_directory_of_ours_and_empty_ones_are_replaced(tmp_path, to):
    out = tmp_path / "out"
    out.mkdir()
    assert convert(source(tmp_path, tiny(1, seed=1)), out, to) == 0  # an empty directory
    head = "head.fc.weight" if to == "timm" else "classifier.weight"
    first = load_file(out / "model.safetensors")[head]
    assert convert(source(tmp_path, tiny(1, seed=2)), out, to) == 0  # one we wrote
    assert not torch.equal(load_file(out / "model.safetensors")[head], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "out"]
    # hf writes into a timm directory of ours too (and back): it is still ours
    other = "timm" if to == "hf" else "hf"
    assert convert(tmp_path / "model.safetensors", out, other) == 0
    assert read_model_dir(out).origin == ("timm" if other == "timm" else "transformers")


def test_failed_write_keeps_the_old_directory(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_hf_dir(tiny(1, seed=1), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model_dirs, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_hf_dir(tiny(1, seed=2), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    "to,overrides,message",
    [
        ("hf", dict(ape=True), "absolute position embedding"),
        ("timm", dict(ape=True), "absolute position embedding"),
        ("hf", dict(qkv_bias=False), "q/v biases"),
        ("hf", dict(patch_norm=False), "normalises the patch embedding"),
        ("timm", dict(patch_norm=False), "normalises the patch embedding"),
        # transformers' V1 cannot run a map smaller than its window (stage 3 is 4x4, the window 7)
        ("hf", dict(depths=(2, 2, 2), num_heads=(1, 2, 4)), "smaller than the window"),
        ("timm", dict(img_size=58), "not a multiple of the patch size"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, capsys, to, overrides, message):
    assert convert(source(tmp_path, tiny(1, **overrides)), tmp_path / "out", to) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_small_map_rule(tmp_path, caplog):
    model = tiny(1)
    # pad_shift keeps the shift on stage 2's 7x7 map, where transformers and timm drop it: other logits at 56
    model.small_map = "pad_shift"
    for write in (write_hf_dir, write_timm_dir):
        with pytest.raises(ValueError, match="small_map='pad_shift'"):
            write(model, tmp_path / "out")
    # pad agrees at the training size; transformers differs only on smaller maps: a warning
    model.small_map = "pad"
    with caplog.at_level(logging.WARNING, logger="swinx"):
        write_hf_dir(model, tmp_path / "hf")
        write_timm_dir(model, tmp_path / "timm")
    assert len([r for r in caplog.records if "small_map='pad'" in r.getMessage()]) == 1  # transformers' only
    assert read_model_dir(tmp_path / "hf").config.small_map == "clamp"


def test_bad_arguments(tmp_path):
    model = tiny(1)
    with pytest.raises(ValueError, match="4 class names"):
        write_hf_dir(model, tmp_path / "a", class_names=NAMES[:4])
    with pytest.raises(ValueError, match="interpolation 'lanczos'"):
        write_hf_dir(model, tmp_path / "b", preprocessing={"interpolation": "lanczos"})
    with pytest.raises(ValueError, match="mean has 1 values"):
        write_timm_dir(model, tmp_path / "c", preprocessing={"mean": [0.5]})
    with pytest.raises(ValueError, match="SwinBackbone"):
        write_hf_dir(swinx.SwinBackbone(model.config, out_indices=(0, 1)), tmp_path / "d")
    assert not list(tmp_path.iterdir())
