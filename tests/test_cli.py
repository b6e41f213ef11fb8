"""The swinx command and the library's import hygiene."""

from __future__ import annotations

import subprocess
import sys

import torch

import swinx
from helpers import SMALL, randomize
from swinx.cli import main
from swinx.weights.layouts import infer_config


def test_library_imports_no_reference_implementation():
    code = "import sys, swinx, swinx.cli; bad = {'timm', 'transformers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_lists_exact_counts(capsys):
    assert main(["models", "--short"]) == 0
    out = capsys.readouterr().out
    assert "swin_t" in out and "28,288,354" in out and "196,739,932" in out


def test_convert_between_layouts_without_naming_the_variant(tmp_path, capsys):
    model = randomize(swinx.create_model("swinv2_t", num_classes=4, **SMALL)).eval()
    src = tmp_path / "tv.pth"
    torch.save(swinx.export_state_dict(model, "torchvision"), src)
    assert main(["convert", str(src), str(tmp_path / "m.safetensors"), "--to", "swinx"]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.pth"), "--to", "official"]) == 0
    back = swinx.load_model(tmp_path / "m.safetensors").eval()
    assert back.small_map == "pad"  # torchvision's rule came along with its weights
    official = swinx.SwinTransformer(back.config).eval()
    swinx.load_checkpoint(official, tmp_path / "o.pth")
    model.small_map = "pad"  # at 64x64 the last maps are smaller than the window, where the rules differ
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-6) and torch.allclose(official(x), model(x), atol=1e-6)


def test_convert_errors_are_clear(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert main(["convert", str(junk), str(tmp_path / "o.pth"), "--to", "timm"]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"), "--to", "timm"]) == 2
    assert "does not exist" in capsys.readouterr().err
    model = swinx.create_model("swin_t", **SMALL)
    torch.save(model.state_dict(), tmp_path / "small.pth")
    assert (
        main(["convert", str(tmp_path / "small.pth"), str(tmp_path / "o.pth"), "--to", "timm", "--model", "swin_t"])
        == 2
    )
    assert "shapes differ" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


def test_demo_runs(capsys):
    assert main(["demo", "--model", "swinv2_t"]) == 0
    out = capsys.readouterr().out
    assert "200x312" in out and out.count("max |diff| 0.0e+00") == len(swinx.LAYOUTS)


def test_infer_config_reads_every_layout():
    for version, name in ((1, "swin_t"), (2, "swinv2_t")):
        model = swinx.create_model(name, num_classes=6, embed_dim=48, depths=(2, 4, 2, 2), num_heads=(2, 4, 8, 16))
        for layout in swinx.LAYOUTS:
            config = infer_config(swinx.export_state_dict(model, layout), layout)
            assert (config.version, config.embed_dim, config.depths, config.num_heads, config.num_classes) == (
                version,
                48,
                (2, 4, 2, 2),
                (2, 4, 8, 16),
                6,
            ), layout
            if version == 1 or layout in ("official", "torchvision"):
                assert config.window_size == model.config.window_size
