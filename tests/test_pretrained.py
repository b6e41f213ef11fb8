"""Pretrained weights where users keep them: hub ids (through a real huggingface_hub cache the tests
build), transformers and timm model directories, official files; offline, never the network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import swinx
from helpers import max_diff, one_thread, randomize  # noqa: F401 - one_thread: a fixture
from swinx.cli import main
from swinx.weights.checkpoint import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FIXTURES = Path(__file__).parent / "fixtures" / "official"
CLASSES = ["cat", "dog", "emu"]
TINY = dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4, image_size=32)


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """Every test: an empty hub cache of its own, and huggingface_hub told not to go online."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> Path:
    """Lay a model directory's files out as huggingface_hub's cache keeps a download: content-addressed
    blobs, a snapshot of relative symlinks per commit, refs/main naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


def assert_valid_cache(cache: Path, repo_id: str) -> None:
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    assert repo_id in {r.repo_id for r in info.repos}


def hf_model(tmp_path: Path, version: int, **config) -> tuple[torch.nn.Module, Path]:
    """A randomised transformers classifier saved with save_pretrained, and an image processor beside it."""
    import transformers

    kind = transformers.SwinConfig if version == 1 else transformers.Swinv2Config
    model_class = transformers.SwinForImageClassification if version == 1 else transformers.Swinv2ForImageClassification
    cfg = kind(
        **{**TINY, **config},
        num_labels=3,
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )
    model = randomize(model_class(cfg)).eval()
    folder = tmp_path / f"hf-v{version}"
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2
    ).save_pretrained(folder)
    return model, folder


def timm_model(tmp_path: Path, arch: str, **args) -> tuple[torch.nn.Module, Path]:
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model(arch, pretrained=False, num_classes=3, **args)
    randomize(model).eval()
    folder = tmp_path / f"timm-{arch}"
    save_for_hf(model, folder, model_config={"label_names": CLASSES}, safe_serialization=True)
    return model, folder


def image(size=32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def check_hf(ours, theirs, sizes=(32,)) -> None:
    ours.eval()
    with torch.no_grad():
        for size in sizes:
            assert max_diff(ours(image(size)), theirs(pixel_values=image(size)).logits) < 1e-4
    assert ours.class_names == CLASSES


# ----- transformers ----------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_hf_model_directory(tmp_path, version):
    theirs, folder = hf_model(tmp_path, version)
    ours = swinx.create_model(folder, pretrained=True)
    check_hf(ours, theirs)
    assert ours.config.version == version and ours.config.img_hw == (32, 32)
    spec = ours.pretrained_cfg
    assert spec["mean"] == [0.5, 0.4, 0.3] and spec["std"] == [0.2, 0.25, 0.3]
    assert spec["interpolation"] == "bilinear" and spec["img_size"] == 32 and spec["origin"] == "transformers"


def test_hf_v2_window_sizes_come_from_config_json(tmp_path):
    """V2's pretrained window sizes change the position-bias coordinates but no tensor shape: only
    config.json says them. Without them the logits differ; with them they match."""
    theirs, folder = hf_model(tmp_path, 2, pretrained_window_sizes=[3, 2])
    ours = swinx.create_model(None, pretrained=folder)
    assert ours.config.pretrained_window_sizes == (3, 2)
    check_hf(ours, theirs)
    plain = swinx.create_model(folder, pretrained=True, pretrained_window_sizes=(0, 0)).eval()
    with torch.no_grad():
        assert max_diff(plain(image()), theirs(pixel_values=image()).logits) > 1e-3


@pytest.mark.parametrize("version", [1, 2])
def test_hf_hub_id_from_the_offline_cache(tmp_path, version):
    theirs, folder = hf_model(tmp_path, version)
    repo_id = f"microsoft/swin{'v2' if version == 2 else ''}-tiny-test"
    put_in_hub_cache(tmp_path / "hub", repo_id, folder)
    assert_valid_cache(tmp_path / "hub", repo_id)
    for source in (repo_id, f"hf-hub:{repo_id}", f"{repo_id}@main"):
        ours = swinx.create_model(source, pretrained=True)
        check_hf(ours, theirs, sizes=(32,))
    assert ours.pretrained_cfg["source"] == f"{repo_id}@main"


def test_hub_id_with_new_head(tmp_path):
    theirs, folder = hf_model(tmp_path, 1)
    put_in_hub_cache(tmp_path / "hub", "microsoft/swin-tiny-test", folder)
    model = swinx.create_model("microsoft/swin-tiny-test", pretrained=True, num_classes=7)
    assert model.num_classes == 7 and model.class_names is None
    assert model.load_report.head.startswith("replaced")
    trunk = theirs.swin.embeddings.patch_embeddings.projection.weight
    assert torch.equal(model.patch_embed.proj.weight, trunk)


# ----- timm ------------------------------------------------------------------------------------------
TIMM_CASES = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=32),
    "swinv2_tiny_window8_256": dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=32),
}


@pytest.mark.parametrize("arch", TIMM_CASES)
def test_timm_directory_and_hub_id(tmp_path, arch):
    theirs, folder = timm_model(tmp_path, arch, **TIMM_CASES[arch])
    repo_id = f"timm/{arch}.test_in1k"
    put_in_hub_cache(tmp_path / "hub", repo_id, folder)
    assert_valid_cache(tmp_path / "hub", repo_id)
    for source in (folder, repo_id, f"hf-hub:{repo_id}"):
        ours = swinx.create_model(source, pretrained=True).eval()
        with torch.no_grad():
            for size in (32,):
                assert max_diff(ours(image(size)), theirs(image(size))) < 1e-4
        assert ours.class_names == CLASSES
        assert ours.pretrained_cfg["origin"] == "timm" and ours.pretrained_cfg["crop_pct"] == 0.9


def test_timm_weights_into_a_named_variant(tmp_path):
    """create_model(name, pretrained=SOURCE): the variant's architecture, the source's weights."""
    import timm

    theirs = randomize(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3)).eval()
    from timm.models._hub import save_for_hf

    save_for_hf(theirs, tmp_path / "t", model_config={"label_names": CLASSES}, safe_serialization=True)
    ours = swinx.create_model("swin_t", pretrained=tmp_path / "t", num_classes=3).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) < 1e-4
    assert ours.class_names == CLASSES


# ----- official files ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["v1_w7_224", "v2_w8_256"])
def test_official_pth(case):
    io = torch.load(FIXTURES / f"{case}.io.pt", weights_only=True)
    ours = swinx.create_model(None, pretrained=FIXTURES / f"{case}.pth").eval()
    with torch.no_grad():
        assert max_diff(ours(io["input"]), io["logits"]) < 1e-4
    assert ours.class_names is None  # the official files carry no names, and 10 classes are not ImageNet's


def test_imagenet_classes_come_with_a_1000_class_file(tmp_path):
    model = randomize(swinx.create_model("swin_t", embed_dim=16, depths=(2, 2), num_heads=(1, 2)))
    torch.save({"model": swinx.export_state_dict(model, "official")}, tmp_path / "in1k.pth")
    ours = swinx.create_model(None, pretrained=tmp_path / "in1k.pth")
    assert len(ours.class_names) == 1000 and ours.class_names[0] == "tench"


def test_swinx_file_brings_its_own_classes_and_input(tmp_path):
    model = randomize(swinx.create_model("swin_t", embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=3))
    spec = {
        "img_size": 64,
        "channels": 3,
        "mean": [0.1] * 3,
        "std": [0.3] * 3,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }
    swinx.save_model(model, tmp_path / "m.safetensors", CLASSES, {"input": __import__("json").dumps(spec)})
    ours = swinx.create_model(None, pretrained=tmp_path / "m.safetensors")
    assert ours.class_names == CLASSES and ours.pretrained_cfg["mean"] == [0.1] * 3
    assert torch.equal(ours.head.weight, model.head.weight)


# ----- --init takes the same sources -------------------------------------------------------------------------
def test_load_checkpoint_reads_hub_ids_and_directories(tmp_path):
    theirs, folder = hf_model(tmp_path, 1)
    put_in_hub_cache(tmp_path / "hub", "microsoft/swin-tiny-test", folder)
    for source in (folder, "microsoft/swin-tiny-test"):
        model = swinx.create_model(
            "swin_t", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=3
        )
        report = swinx.load_checkpoint(model, source)
        assert report.head == "loaded"
        assert torch.equal(model.head.weight, theirs.classifier.weight)


# ----- bad input ----------------------------------------------------------------------------------------------
def one_line_error(capsys, *argv) -> str:
    capsys.readouterr()  # what setting up printed (transformers' progress bars)
    assert main(list(argv)) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_unknown_hub_id_offline_names_the_cache(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        swinx.create_model("microsoft/swin-nothing-here", pretrained=True)
    err = one_line_error(
        capsys, "convert", "microsoft/swin-nothing-here", str(tmp_path / "o.safetensors"), "--to", "timm"
    )
    assert str(tmp_path / "hub" / "models--microsoft--swin-nothing-here") in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_directory_without_weights(tmp_path, capsys):
    _, folder = hf_model(tmp_path, 1)
    (folder / "model.safetensors").unlink()
    err = one_line_error(capsys, "convert", str(folder), str(tmp_path / "o.safetensors"), "--to", "timm")
    assert "no weights" in err and "model.safetensors" in err
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, "convert", str(tmp_path / "empty"), str(tmp_path / "o.safetensors"), "--to", "timm")
    assert "without a model" in err


def test_config_of_another_architecture(tmp_path, capsys):
    import transformers

    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32
        )
    )
    vit.save_pretrained(tmp_path / "vit")
    err = one_line_error(capsys, "convert", str(tmp_path / "vit"), str(tmp_path / "o.safetensors"), "--to", "timm")
    assert "'vit'" in err and "not a Swin" in err
    with pytest.raises(CheckpointError, match="not a Swin"):
        swinx.create_model(tmp_path / "vit", pretrained=True)


def test_half_downloaded_hub_file(tmp_path, capsys):
    """An interrupted download leaves blobs/<hash>.incomplete and no snapshot link; a copied cache can
    also hold a truncated file. Either way: one line naming the file, and what to do."""
    _, folder = hf_model(tmp_path, 1)
    repo = put_in_hub_cache(tmp_path / "hub", "microsoft/swin-half", folder)
    link = repo / "snapshots" / ("a" * 40) / "model.safetensors"
    blob = link.resolve()
    link.unlink()
    partial = blob.with_name(blob.name + ".incomplete")
    partial.write_bytes(blob.read_bytes()[:1000])
    blob.unlink()
    err = one_line_error(capsys, "convert", "microsoft/swin-half", str(tmp_path / "o.safetensors"), "--to", "timm")
    assert "interrupted" in err and str(partial) in err

    repo = put_in_hub_cache(tmp_path / "hub", "microsoft/swin-cut", folder)
    blob = (repo / "snapshots" / ("a" * 40) / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:5000])
    err = one_line_error(capsys, "convert", "microsoft/swin-cut", str(tmp_path / "o.safetensors"), "--to", "timm")
    assert "model.safetensors" in err and "download again" in err


def test_not_a_source(tmp_path):
    with pytest.raises(CheckpointError, match="not a file or directory, nor a hub id"):
        swinx.create_model(None, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="timm/swin_tiny_patch4_window7_224.ms_in1k is not in the Hugging Face"):
        swinx.create_model("swin_t", pretrained=True)


def test_pretrained_true_for_a_name_is_timms_hub_repository(tmp_path):
    """create_model(name, pretrained=True) reads timm's repository of that name's default weights,
    as timm.create_model(name, pretrained=True) would; every name maps to the id timm itself uses."""
    from timm.models import get_pretrained_cfg

    from swinx.model.variants import hub_id

    for name in swinx.list_models():
        expected = get_pretrained_cfg(hub_id(name).removeprefix("timm/"))
        assert expected is not None and expected.hf_hub_id == hub_id(name), name
    assert hub_id("swin_t") == "timm/swin_tiny_patch4_window7_224.ms_in1k"
    theirs, folder = timm_model(tmp_path, "swin_tiny_patch4_window7_224")
    put_in_hub_cache(tmp_path / "hub", "timm/swin_tiny_patch4_window7_224.ms_in1k", folder)
    ours = swinx.create_model("swin_tiny_patch4_window7_224", pretrained=True, num_classes=3).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) < 1e-4


def test_convert_a_hub_model_to_a_timm_directory(tmp_path, capsys):
    """`swinx convert HUB_ID OUT --to timm`: transformers' weights, names and preprocessing come out as a
    directory timm loads, giving transformers' logits."""
    import timm

    theirs, folder = hf_model(tmp_path, 1)
    put_in_hub_cache(tmp_path / "hub", "microsoft/swin-tiny-test", folder)
    assert main(["convert", "microsoft/swin-tiny-test", str(tmp_path / "out"), "--to", "timm"]) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    with torch.no_grad():
        assert max_diff(model(image()), theirs(pixel_values=image()).logits) < 1e-4
    assert model.pretrained_cfg["label_names"] == CLASSES
    assert list(model.pretrained_cfg["mean"]) == [0.5, 0.4, 0.3]


def test_predict_with_a_hub_model(tmp_path, capsys):
    """`swinx predict --checkpoint HUB_ID`: transformers' class names, and its processor's preprocessing."""
    import json

    from PIL import Image

    from swinx.classification.inference import load_for_inference

    theirs, folder = hf_model(tmp_path, 1)
    put_in_hub_cache(tmp_path / "hub", "microsoft/swin-tiny-test", folder)
    loaded = load_for_inference("microsoft/swin-tiny-test")
    assert loaded.class_names == CLASSES and loaded.input["mean"] == [0.5, 0.4, 0.3]
    Image.new("RGB", (40, 30), (200, 30, 90)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", "microsoft/swin-tiny-test", str(tmp_path / "x.png"), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert {t["class"] for t in top} == set(CLASSES)


@pytest.mark.usefixtures("one_thread")
def test_train_init_from_a_hub_id(tmp_path, capsys):
    """`swinx train --init HUB_ID`: the hub weights fine-tuned, normalised with their own mean/std."""
    import yaml
    from PIL import Image

    theirs, folder = hf_model(tmp_path, 1)
    put_in_hub_cache(tmp_path / "hub", "microsoft/swin-tiny-test", folder)
    for split in ("train", "val"):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            (tmp_path / "data" / split / CLASSES[c]).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), colour).save(tmp_path / "data" / split / CLASSES[c] / f"{i}.png")
    args = ["train", "--data", str(tmp_path / "data"), "--init", "microsoft/swin-tiny-test", "--model", "swin_t"]
    args += ["--model-args", '{"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]}', "--window-size", "4"]
    args += [
        "--img-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--progress",
        "off",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "initialised from microsoft/swin-tiny-test" in out and "head: loaded" in out
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["mean"] == [0.5, 0.4, 0.3] and saved["std"] == [0.2, 0.25, 0.3]
