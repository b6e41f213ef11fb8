"""Export: the index-arithmetic window attention, ONNX and torch.export with dynamic sizes, predict --onnx."""

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import swinx
from helpers import one_thread, randomize  # noqa: F401
from swinx.cli import main
from swinx.model.windows import window_geometry, window_index
from swinx.tools.export import (
    ExportError,
    default_sizes,
    export_onnx,
    export_program,
    min_side,
    onnx_session,
    read_onnx_metadata,
    read_program_metadata,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Maps in every regime: multiples of the window, padded, clamped to a smaller window along the
# shorter side (7x10, 4x6, 6x4), a single row, tiny, and exactly one window.
MAPS = [(14, 14), (13, 20), (7, 10), (4, 6), (6, 4), (1, 9), (3, 3), (8, 8), (15, 7), (28, 29), (7, 7), (2, 2)]


def small_model(version=1, small_map="clamp", pretrained=0, classes=5, **overrides):
    config = swinx.SwinConfig(
        embed_dim=16,
        depths=(2, 2, 2),
        num_heads=(1, 2, 4),
        window_size=7,
        version=version,
        pretrained_window_sizes=(pretrained,) * 3,
        small_map=small_map,
        img_size=56,
        num_classes=classes,
        **overrides,
    )
    torch.manual_seed(version * 10 + pretrained)
    return randomize(swinx.SwinTransformer(config)).eval()


@pytest.mark.parametrize("small_map", ["clamp", "pad", "pad_shift"])
@pytest.mark.parametrize("version,pretrained", [(1, 0), (2, 0), (2, 5)])
def test_indexed_window_attention_equals_pad_roll_partition(version, pretrained, small_map):
    model = small_model(version, small_map, pretrained)
    torch.manual_seed(1)
    for block in model.blocks():
        dim = block.norm1.normalized_shape[0]
        for H, W in MAPS:
            x = torch.randn(2, H, W, dim)
            post_norm = block.norm1 if version == 2 else None
            with torch.no_grad():
                expected = block.window_attention(x, post_norm=post_norm)
                got = block.indexed_window_attention(x, post_norm)
            assert (got - expected).abs().max() < 1e-5, (H, W, block.shift_size)


@pytest.mark.parametrize("small_map", ["clamp", "pad_shift"])
def test_window_index_covers_every_token_once_and_marks_the_shift(small_map):
    for H, W in MAPS:
        for shift in (0, 3):
            index = window_index(H, W, 7, shift, small_map)
            g = window_geometry(H, W, 7, shift, small_map)
            # scatter is a permutation into real slots: every token read back from exactly its own slot
            assert index.scatter.unique().numel() == H * W
            assert torch.equal(index.gather[index.scatter], torch.arange(H * W))
            # one spare window, all padding, so the window count is never 1
            rows, cols = -(-(H + g.pad[0]) // g.window[0]), -(-(W + g.pad[1]) // g.window[1])
            assert index.num_windows == rows * cols + 1
            assert (index.gather[-49:] == H * W).all()
            assert int(index.used.sum()) == g.window[0] ** 2
            labels = index.labels[:-1, index.used]  # the real windows' slots
            mixed = (labels != labels[:, :1]).any(1)  # windows with more than one region
            assert bool(mixed.any()) == g.has_shift


def mmdet_window_attention(block, x: torch.Tensor) -> torch.Tensor:
    """mmdetection's ShiftWindowMSA geometry on a (B, H, W, C) map, written out independently of windows.py:
    pad to a multiple of the window, roll by the block's shift whatever the map size, mask by the padded map's
    nine slices, attend per window (our attention module with that bias), reverse, crop. -> (B, H, W, C)."""
    from test_windows import mmdet_style_mask

    B, H, W, C = x.shape
    M, s = block.window_size, block.shift_size
    x = F.pad(x, (0, 0, 0, (M - W % M) % M, 0, (M - H % M) % M))
    Hp, Wp = x.shape[1:3]
    bias = block.attn.position_bias((M, M))[None]  # (1, heads, N, N)
    if s:
        x = torch.roll(x, (-s, -s), (1, 2))
        bias = bias + mmdet_style_mask(Hp, Wp, M, s)[:, None]
    windows = x.view(B, Hp // M, M, Wp // M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, M * M, C)
    out = block.attn(windows, bias=bias)
    out = out.view(B, Hp // M, Wp // M, M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if s:
        out = torch.roll(out, (s, s), (1, 2))
    return out[:, :H, :W]


def test_pad_shift_is_mmdetections_rule():
    """Eager pad_shift equals mmdetection's geometry on every map, the ones smaller than a window included,
    and differs from the clamp rule where a shifted block meets a map of one window on a side. (Not on maps of
    at most `shift` tokens a side: the roll puts them all in the last region, alone with each other, which is
    the clamped window's attention.)"""
    model = small_model(1, "pad_shift")
    clamp = small_model(1, "clamp")
    torch.manual_seed(2)
    for block, other in zip(model.blocks(), clamp.blocks()):
        dim = block.norm1.normalized_shape[0]
        for H, W in MAPS:
            x = torch.randn(2, H, W, dim)
            with torch.no_grad():
                got = block.window_attention(x)
                assert (got - mmdet_window_attention(block, x)).abs().max() < 1e-5, (H, W, block.shift_size)
                if block.shift_size and block.shift_size < min(H, W) <= 7:
                    assert (got - other.window_attention(x)).abs().max() > 1e-3, (H, W)


def check_acceptance_sizes(path, model, sizes, batches):
    session = onnx_session(path)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for h, w in sizes:
        for batch in batches:
            x = torch.randn(batch, 3, h, w, generator=generator)
            with torch.no_grad():
                expected = model(x)
            got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
            assert got.shape == expected.shape
            worst = max(worst, (got - expected).abs().max().item())
    return worst


ACCEPTANCE = [(224, 224), (256, 256), (200, 312), (384, 384)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "swinv2_t"])
def test_one_onnx_export_runs_every_size_in_onnxruntime(name, tmp_path):
    """Acceptance: one export of swin_t / swinv2_t, onnxruntime at 224, 256, 200x312 and 384, batches 1 and 5.

    These sizes switch the last stage between a clamped window without shift (224 and 200x312:
    7 tokens; swinv2_t's window drops from 8 to 7) and shifted, padded windows (256, 384).
    """
    torch.manual_seed(0)
    model = randomize(swinx.create_model(name)).eval()
    report = export_onnx(model, tmp_path / f"{name}.onnx", sizes=[(96, 160)], batches=(1,))
    assert report.max_abs_diff <= 1e-4
    worst = check_acceptance_sizes(tmp_path / f"{name}.onnx", model, ACCEPTANCE, (1, 5))
    assert worst <= 1e-4, worst
    graph = onnx.load(tmp_path / f"{name}.onnx").graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # symbolic B, H, W


@pytest.mark.slow
@pytest.mark.parametrize("opset,attention", [(18, "exact"), (23, "fused"), (23, "exact")])
def test_onnx_opsets_and_attention_choices(opset, attention, tmp_path):
    model = small_model(2, pretrained=5)
    report = export_onnx(
        model,
        tmp_path / "m.onnx",
        opset=opset,
        attention=attention,
        sizes=[(56, 56), (17, 17), (30, 101), (9 * 16 + 3, 50)],
        batches=(1, 3),
    )
    assert len(report.checks) == 8 and report.max_abs_diff <= 1e-4
    proto = onnx.load(tmp_path / "m.onnx")
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    ops = {n.op_type for n in proto.graph.node}
    assert ("Attention" in ops) == (opset >= 23 and attention == "fused")
    assert "If" not in ops  # one graph for every size, no branch on it
    assert model.blocks().__next__().attn.fused  # the caller's model is left as it was


@pytest.mark.slow
def test_onnx_export_pad_shift(tmp_path):
    """One ONNX export of a pad_shift model (OpenMMLab's rule) runs sizes whose last maps are padded to a
    single window with the shift kept (30x101: stage maps 8x26, 4x13, 2x7), and larger ones, with no `If`."""
    model = small_model(1, "pad_shift")
    report = export_onnx(model, tmp_path / "m.onnx", sizes=[(30, 101)], batches=(1,))
    assert report.max_abs_diff <= 1e-4
    assert check_acceptance_sizes(tmp_path / "m.onnx", model, [(17, 40), (56, 56), (120, 33)], (1, 2)) <= 1e-4
    assert "If" not in {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}


@pytest.mark.slow
@pytest.mark.parametrize("version,small_map", [(1, "clamp"), (2, "pad")])
def test_torch_export_program_any_size(version, small_map, tmp_path):
    model = small_model(version, small_map)
    model.class_names = list("abcde")
    report = export_program(
        model, tmp_path / "m.pt2", sizes=[(56, 56), (17, 40), (200, 31)], batches=(1, 4), extra_metadata={"note": "hi"}
    )
    assert len(report.checks) == 6 and report.max_abs_diff <= 1e-4
    info = read_program_metadata(tmp_path / "m.pt2")
    assert info["class_names"] == list("abcde") and info["note"] == "hi" and info["min_side"] == min_side(model) == 17
    assert swinx.SwinConfig.from_dict(info["config"]) == model.config


def test_default_verification_sizes_are_the_issues_for_224():
    assert default_sizes(swinx.create_model("swin_t", num_classes=0)) == ACCEPTANCE


def write_images(folder, count=3, size=(70, 90)):
    paths = []
    generator = torch.Generator().manual_seed(3)
    for i in range(count):
        pixels = (torch.rand(*size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_cli_export_then_predict_with_onnxruntime_matches_pytorch(tmp_path, capsys):
    model = small_model(classes=3)
    swinx.save_model(model, tmp_path / "m.safetensors", class_names=["cat", "dog", "owl"])
    out = tmp_path / "deploy" / "m.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "m.safetensors"),
                "--format",
                "onnx",
                str(out),
                "--verify-sizes",
                "56",
                "30x100",
                "--verify-batches",
                "1",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "verified: max |diff|" in printed and "batch 2 at 30x100" in printed and "17..8192" in printed
    info = read_onnx_metadata(onnx_session(out))
    assert info["class_names"] == ["cat", "dog", "owl"] and info["input"]["img_size"] == 56

    images = write_images(tmp_path)
    assert main(["predict", "--onnx", str(out), "--json", "--topk", "3", *images]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), "--json", "--topk", "3", *images]) == 0
    from_torch = json.loads(capsys.readouterr().out)
    for a, b in zip(from_onnx, from_torch):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert all(abs(s["probability"] - t["probability"]) < 1e-5 for s, t in zip(a["top"], b["top"]))

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["predict", "--onnx", str(out), images[0], str(broken)]) == 1
    captured = capsys.readouterr()
    assert "broken.png: error: cannot decode image" in captured.err and f"{images[0]}:" in captured.out


@pytest.mark.slow
def test_cli_export_torch_program(tmp_path, capsys):
    swinx.save_model(small_model(2, pretrained=5), tmp_path / "m.safetensors")
    out = tmp_path / "m.pt2"
    code = main(
        [
            "export",
            "--checkpoint",
            str(tmp_path / "m.safetensors"),
            "--format",
            "torch-export",
            str(out),
            "--verify-sizes",
            "64",
            "20x90",
            "--verify-batches",
            "1",
            "3",
        ]
    )
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "torch.export.load vs PyTorch, batch 3 at 20x90" in printed and "verified" in printed
    assert read_program_metadata(out)["input"]["img_size"] == 56


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "swin_t", "--format", "onnx", "--opset", "17"], "opset 17 is not supported"),
        (["--model", "swin_t", "--format", "onnx", "--verify-sizes", "20"], "outside what the export accepts"),
        (["--model", "swin_t", "--format", "onnx", "--verify-sizes", "big"], "is not N or HxW"),
        (["--checkpoint", "missing.safetensors", "--format", "onnx"], "does not exist"),
        (["--model", "swin_nano", "--format", "onnx"], "swin_nano"),
    ],
)
def test_cli_export_bad_input(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "out.onnx", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swinx export: error:") and message in err
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_cli_export_unknown_format_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "out.x", "--model", "swin_t", "--format", "tflite"])
    assert e.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_predict_onnx_bad_files(tmp_path, capsys):
    images = write_images(tmp_path, count=1)
    assert main(["predict", "--onnx", str(tmp_path / "nothing.onnx"), *images]) == 2
    assert "nothing.onnx does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    assert main(["predict", "--onnx", str(junk), *images]) == 2
    assert "onnxruntime cannot load" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--onnx", str(junk), "--checkpoint", "x", *images])


@pytest.mark.slow
def test_failed_verification_leaves_the_old_file(tmp_path, monkeypatch):
    from swinx.tools import export

    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # every comparison fails
    with pytest.raises(ExportError, match="does not reproduce the model"):
        export_onnx(small_model(), out, sizes=[(56, 56)], batches=(1,))
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
