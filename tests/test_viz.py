"""`swinx viz`: the pictures render, and the numbers behind them are the model's."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
import torch
from PIL import Image

import swinx
from helpers import one_thread, randomize  # noqa: F401  (one_thread is a fixture)
from swinx.cli import main
from swinx.model.windows import cyclic_shift, region_labels, shift_mask, window_partition
from swinx.tools import viz

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_V1 = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4))
CHELSEA_HW = (300, 451)


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory):
    """skimage's chelsea, 300x451 RGB: rectangular and not a multiple of any window."""
    from skimage.data import chelsea as cat

    path = tmp_path_factory.mktemp("images") / "chelsea.png"
    Image.fromarray(cat()).save(path)
    return path


@pytest.fixture(scope="module")
def v1_checkpoint(tmp_path_factory):
    model = randomize(swinx.create_model("swin_t", num_classes=5, **SMALL_V1), seed=1).eval()
    path = tmp_path_factory.mktemp("v1") / "v1.safetensors"
    swinx.save_model(model, path, class_names=list("abcde"))
    return path


@pytest.fixture(scope="module")
def v2_gray_checkpoint(tmp_path_factory):
    """A V2 model on one channel (the MNIST path: gray images, MNIST normalisation)."""
    model = randomize(
        swinx.create_model(
            "swinv2_t", num_classes=3, in_chans=1, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=6
        ),
        seed=2,
    ).eval()
    path = tmp_path_factory.mktemp("v2") / "v2.safetensors"
    swinx.save_model(model, path)
    return path


def check_png(path, size: tuple[int, int] | None = None, min_colors: int = 40) -> np.ndarray:
    """A valid PNG of the expected pixel size (width, height) with non-trivial content."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size is not None:
            assert image.size == size
        assert min(image.size) >= 300
        pixels = np.asarray(image.convert("RGB"))
    colors = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colors >= min_colors, colors
    assert pixels.std() > 20
    return pixels


# ---------------------------------------------------------------------------------------------
# windows


def test_stage_layouts_at_the_acceptance_size():
    layouts = viz.stage_layouts(swinx.get_config("swin_t"), CHELSEA_HW)
    assert [(l.height, l.width) for l in layouts] == [(75, 113), (38, 57), (19, 29), (10, 15)]
    assert [l.padded for l in layouts] == [(77, 119), (42, 63), (21, 35), (14, 21)]
    assert [l.token for l in layouts] == [4, 8, 16, 32]
    assert all(l.shifted.shift == (3, 3) and l.regular.shift == (0, 0) for l in layouts)
    # the maps are those the model really runs on
    model = swinx.create_model("swin_t", **SMALL_V1).eval()
    with torch.no_grad():
        maps = [f.shape[2:] for f in model.forward_intermediates(torch.zeros(1, 3, *CHELSEA_HW))]
    assert [tuple(m) for m in maps] == [(l.height, l.width) for l in layouts]
    # a small image: the last maps fit one window, so the clamp rule shrinks it and turns the shift off
    small = viz.stage_layouts(swinx.get_config("swin_t"), (64, 96))
    assert (small[2].height, small[2].width) == (4, 6)
    assert small[2].shifted.window == (4, 4) and not small[2].shifted.has_shift


def test_windows_picture(chelsea, tmp_path, capsys):
    out = tmp_path / "windows.png"
    assert main(["viz", "windows", str(chelsea), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    pixels = check_png(out, min_colors=100)
    assert pixels.shape[1] == round((2 * 3.5 + 0.3) * 120) and pixels.shape[0] > pixels.shape[1]
    assert out.stat().st_size < 400_000
    # other sizes and the torchvision rule, where a shift turns off along one axis only
    out2 = tmp_path / "pad.png"
    assert main(["viz", "windows", str(chelsea), "--size", "100", "150", "--small-map", "pad", "--out", str(out2)]) == 0
    check_png(out2)


def test_shifted_windows_drawn_where_the_model_puts_them():
    """The shifted borders drawn in image coordinates enclose exactly the tokens the model groups."""
    H, W, M, s = 17, 23, 7, 3
    geometry = swinx.model.windows.window_geometry(H, W, M, s)
    Hp, Wp = H + geometry.pad[0], W + geometry.pad[1]
    rows, cols = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    coords = torch.stack([rows, cols], -1)[None]  # (1, Hp, Wp, 2): unrolled positions
    groups = window_partition(cyclic_shift(coords, geometry.shift), geometry.window)[0]  # (nW, N, 2)
    lines = viz._window_lines(geometry, (Hp, Wp), 1)
    row_lines = sorted({int(a[1]) for a, b in lines if a[1] == b[1]})
    col_lines = sorted({int(a[0]) for a, b in lines if a[0] == b[0]})
    # each drawn cell holds the tokens of one window, and every cell holds some
    window_of = {}
    for window, group in enumerate(groups.tolist()):
        for r, c in group:
            cell = (bisect.bisect_right(row_lines, r), bisect.bisect_right(col_lines, c))
            assert window_of.setdefault(cell, window) == window
    assert len(window_of) == (len(row_lines) - 1) * (len(col_lines) - 1)
    assert row_lines == [0, 3, 10, 17, 21] and col_lines == [0, 3, 10, 17, 24, 28]


# ---------------------------------------------------------------------------------------------
# mask


@pytest.mark.parametrize("size, stage", [(CHELSEA_HW, 2), ((224, 224), 1), ((64, 224), 2)])
def test_drawn_masks_are_the_models(size, stage):
    layout = viz.stage_layouts(swinx.get_config("swin_t"), size)[stage - 1]
    g = layout.shifted
    Hp, Wp = layout.padded
    kinds = viz.window_kinds(Hp, Wp, g.window, g.shift)
    reference = shift_mask(Hp, Wp, g.window, g.shift)
    assert [k.name for k in kinds] == ["interior", "last column", "last row", "bottom-right corner"]
    for kind in kinds:
        assert torch.equal(kind.allowed, reference[kind.flat] == 0), kind.name
        assert kind.flat == kind.index[0] * (Wp // g.window[1]) + kind.index[1]
    assert kinds[0].allowed.all()
    assert len(set(kinds[-1].labels.tolist())) == 4  # the corner mixes four regions
    # every window of the map has the mask of its kind
    rows, cols = Hp // g.window[0], Wp // g.window[1]
    by_kind = {(k.index[0] == rows - 1, k.index[1] == cols - 1): k for k in kinds}
    for flat in range(rows * cols):
        r, c = divmod(flat, cols)
        assert torch.equal(by_kind[(r == rows - 1, c == cols - 1)].allowed, reference[flat] == 0)


def test_pad_shift_keeps_the_shift_on_one_window_maps(chelsea, tmp_path):
    """OpenMMLab's rule: at 224 swin_t's last map is 7x7, one window, and stays shifted, so its mask can be
    drawn (the clamp rule has nothing to draw there); the one window mixes four regions, as the model's mask."""
    config = swinx.get_config("swin_t", small_map="pad_shift")
    small = viz.stage_layouts(config, (64, 96))[2]  # a 4x6 map: padded to 7x7, shift kept
    assert small.padded == (7, 7) and small.shifted.window == (7, 7) and small.shifted.shift == (3, 3)
    layout = viz.stage_layouts(config, (224, 224))[3]
    g = layout.shifted
    kinds = viz.window_kinds(*layout.padded, g.window, g.shift)
    assert [k.name for k in kinds] == ["bottom-right corner"]
    assert torch.equal(kinds[0].allowed, shift_mask(*layout.padded, g.window, g.shift)[0] == 0)
    assert sorted(set(kinds[0].labels.tolist())) == [4, 5, 7, 8]
    with pytest.raises(ValueError, match="no shifted windows"):
        viz.draw_mask(tmp_path / "clamp.png", "swin_t", size=(224, 224), stage=4)
    check_png(
        viz.draw_mask(tmp_path / "mask.png", "swin_t", size=(224, 224), stage=4, small_map="pad_shift"), min_colors=2
    )
    check_png(viz.draw_windows(chelsea, tmp_path / "windows.png", "swin_t", size=(100, 150), small_map="pad_shift"))


def test_mask_picture(tmp_path):
    out = tmp_path / "mask.png"
    assert main(["viz", "mask", "--size", *map(str, CHELSEA_HW), "--stage", "2", "--out", str(out)]) == 0
    check_png(out, size=(round(12.0 * 130), round(6.2 * 130)))


# ---------------------------------------------------------------------------------------------
# attention


def normalised(path, loaded) -> torch.Tensor:
    image = viz.load_image(path, loaded.input["channels"])
    return viz._to_input(image, loaded)


def test_stitched_attention_is_the_models(chelsea, v1_checkpoint):
    from swinx.classification.inference import load_for_inference

    loaded = load_for_inference(v1_checkpoint)
    model = loaded.model
    x = normalised(chelsea, loaded)
    att = viz.block_attention(model, x, stage=1, block=1)
    assert (att.height, att.width) == (75, 113) and att.geometry.shift == (3, 3) and att.heads == 1
    Hp, Wp = att.padded

    # the model's own attention, cut as the model cuts it, with the unrolled position of every token
    block = model.layers[0].blocks[1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(x)
        handle.remove()
        _, attn = block.window_attention(block.norm1(seen["x"]), return_attn=True)  # (1, nW, heads, N, N)
    rows, cols = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    coords = window_partition(
        cyclic_shift(torch.stack([rows, cols], -1)[None], att.geometry.shift), att.geometry.window
    )[0]  # (nW, N, 2)
    labels = torch.roll(region_labels(Hp, Wp, att.geometry.window, att.geometry.shift), (3, 3), (0, 1))

    # an interior query, one in the wrapped corner window (regions mixed, padding inside), one at the edge
    for row, col in ((30, 40), (1, 2), (74, 112)):
        found = ((coords[..., 0] == row) & (coords[..., 1] == col)).nonzero()
        window, token = int(found[0, 0]), int(found[0, 1])
        stitched = att.query_map(row, col, padded=True)[0]  # (Hp, Wp)
        for m in range(coords.shape[1]):
            r, c = coords[window, m].tolist()
            assert torch.allclose(stitched[r, c], attn[0, window, 0, token, m], atol=1e-7)
        # zero outside the query's window and region, one in total
        inside = torch.zeros(Hp, Wp, dtype=torch.bool)
        inside[coords[window, :, 0], coords[window, :, 1]] = True
        same_region = labels == labels[row, col]
        assert stitched[~(inside & same_region)].abs().max() < 1e-30
        assert (stitched[inside & same_region] > 0).all()
        assert torch.allclose(stitched.sum(), torch.tensor(1.0), atol=1e-5)
        cropped = att.query_map(row, col)[0]
        assert cropped.shape == (75, 113)
        on_padding = stitched[75:].sum() + stitched[:75, 113:].sum()
        assert torch.allclose(cropped.sum() + on_padding, torch.tensor(1.0), atol=1e-5)
        if (row, col) != (74, 112):  # no padding in these queries' regions: the image holds all of it
            assert on_padding < 1e-30  # masked pairs: exp(-100), not quite 0
        else:  # the last real token shares its region with padding rows
            assert on_padding > 1e-4

    # received: each window's tokens share one unit of attention
    received = att.received_map(padded=True)[0]
    for window in range(coords.shape[0]):
        total = received[coords[window, :, 0], coords[window, :, 1]].sum()
        assert torch.allclose(total, torch.tensor(1.0), atol=1e-5)

    # the pixel map is the token map, blown up
    pixels = viz._upsample(att.query_map(30, 40), 4, CHELSEA_HW, "nearest")[0]
    assert pixels.shape == CHELSEA_HW
    assert torch.equal(pixels[4 * 30 + 2, 4 * 40 + 1], att.query_map(30, 40)[0, 30, 40])


def test_attention_pictures(chelsea, v1_checkpoint, v2_gray_checkpoint, tmp_path):
    out = tmp_path / "query.png"
    assert (
        main(
            [
                "viz",
                "attention",
                "--checkpoint",
                str(v1_checkpoint),
                str(chelsea),
                "--stage",
                "2",
                "--block",
                "1",
                "--head",
                "1",
                "--query",
                "20",
                "30",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    check_png(out)
    out = tmp_path / "heads.png"
    assert (
        main(
            [
                "viz",
                "attention",
                "--checkpoint",
                str(v1_checkpoint),
                str(chelsea),
                "--stage",
                "3",
                "--block",
                "1",
                "--all-heads",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    check_png(out)
    gray = tmp_path / "gray.png"
    Image.open(chelsea).convert("L").resize((90, 60)).save(gray)
    out = tmp_path / "v2.png"
    assert (
        main(
            [
                "viz",
                "attention",
                "--checkpoint",
                str(v2_gray_checkpoint),
                str(gray),
                "--block",
                "1",
                "--all-heads",
                "--query",
                "3",
                "5",
                "--interpolation",
                "bilinear",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    check_png(out)


# ---------------------------------------------------------------------------------------------
# bias


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_bias_images_are_the_models_bias(which, v1_checkpoint, v2_gray_checkpoint, tmp_path):
    path = v1_checkpoint if which == "v1" else v2_gray_checkpoint
    model = swinx.load_model(path).eval()
    attn = model.layers[1].blocks[1].attn
    M = attn.window_size
    images = viz.bias_images(attn)
    assert images.shape == (attn.num_heads, 2 * M - 1, 2 * M - 1)
    with torch.no_grad():
        bias = attn.position_bias((M, M))  # (heads, N, N)
    ys, xs = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + M - 1
    dx = xs[:, None] - xs[None, :] + M - 1
    assert torch.allclose(images[:, dy, dx], bias, atol=1e-6)
    centre = (M - 1) * (2 * M - 1) + (M - 1)  # the table row of offset (0, 0)
    if which == "v1":
        assert torch.equal(images[:, M - 1, M - 1], attn.relative_position_bias_table[centre].detach())
    assert images.std() > 0.1  # randomised: a picture with something in it
    out = tmp_path / "bias.png"
    assert main(["viz", "bias", "--checkpoint", str(path), "--stage", "2", "--block", "1", "--out", str(out)]) == 0
    check_png(out)


# ---------------------------------------------------------------------------------------------
# model


def test_model_summary_of_swin_t(tmp_path, capsys):
    text = viz.model_summary("swin_t", 224)
    for stage, hw in enumerate(("56x56", "28x28", "14x14", "7x7"), start=1):
        line = next(l for l in text.splitlines() if l.startswith(f"stage{stage} "))
        assert line.split()[1] == hw
    assert "28,288,354 parameters" in text and "4.49 GMACs" in text
    assert next(l for l in text.splitlines() if l.startswith("stage3 ")).count("SW") == 3
    assert "W W " in next(l for l in text.splitlines() if l.startswith("stage4 "))  # 7x7 fits one window
    counts = viz._parameter_counts(swinx.get_config("swin_t"))
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"] == 28_288_354
    out = tmp_path / "model.png"
    assert main(["viz", "model", "swin_t", "--size", "224", "224", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "28,288,354" in printed and "4.49 GMACs" in printed and f"wrote {out}" in printed
    check_png(out)
    # at another size and another family, the text follows
    assert "64x64" in viz.model_summary("swinv2_t", 256) and "16x16" in viz.model_summary("swin_t", (512, 512))


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_a_clear_error(chelsea, v1_checkpoint, tmp_path, capsys):
    def fails(args, message):
        assert main(["viz", *args, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("swinx viz: error: ") and message in err, err

    ck = ["--checkpoint", str(v1_checkpoint)]
    fails(
        ["attention", *ck, str(chelsea), "--stage", "2", "--block", "5"],
        "block 5 does not exist: stage 2 of this model has blocks 0-1",
    )
    fails(["attention", *ck, str(chelsea), "--stage", "5"], "stage 5 does not exist: this model has stages 1-4")
    fails(
        ["attention", *ck, str(chelsea), "--stage", "1", "--head", "1"],
        "head 1 does not exist: stage 1 of this model has only head 0",
    )
    fails(
        ["attention", *ck, str(chelsea), "--query", "75", "0"],
        "query (75, 0) is outside stage 1's 75x113 token map: rows 0-74, columns 0-112",
    )
    text = tmp_path / "foo.txt"
    text.write_text("not an image")
    fails(["attention", *ck, str(text)], f"cannot read image {text}: ")
    fails(["windows", str(tmp_path / "missing.png")], "cannot read image")
    fails(["attention", "--checkpoint", str(tmp_path / "none.safetensors"), str(chelsea)], "does not exist")
    fails(["bias", "--checkpoint", str(tmp_path / "none.safetensors")], "does not exist")
    fails(["bias", *ck, "--stage", "3", "--block", "2"], "stage 3 of this model has blocks 0-1")
    fails(["mask", "--stage", "4"], "stage 4 at 224x224 has no shifted windows")
    fails(["mask", "--stage", "0"], "stage 0 does not exist")
    fails(["model", "swin_q"], "unknown model 'swin_q'")
    assert not (tmp_path / "x.png").exists()
