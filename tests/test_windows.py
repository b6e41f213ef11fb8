"""Window geometry and position bias as pure functions."""

from __future__ import annotations

import pytest
import torch

from swinx.model.position import log_spaced_coords, relative_position_index, resize_bias_table, table_window
from swinx.model.windows import (
    MASK_FILL,
    cyclic_shift,
    pad_map,
    region_labels,
    shift_mask,
    window_geometry,
    window_partition,
    window_reverse,
)


@pytest.mark.parametrize("window", [(7, 7), (4, 6)])
def test_partition_then_reverse_is_identity(window):
    x = torch.randn(2, 28, 42, 5)
    windows = window_partition(x, window)
    assert windows.shape == (2, (28 // window[0]) * (42 // window[1]), window[0] * window[1], 5)
    assert torch.equal(windows[0, 0].reshape(*window, 5), x[0, : window[0], : window[1]])  # first window, row-major
    assert torch.equal(windows[0, 1].reshape(*window, 5), x[0, : window[0], window[1] : 2 * window[1]])
    assert torch.equal(window_reverse(windows, window, 28, 42), x)


def test_cyclic_shift_reverses_and_pad_is_bottom_right():
    x = torch.randn(1, 9, 11, 2)
    shifted = cyclic_shift(x, (3, 2))
    assert torch.equal(shifted[0, 0, 0], x[0, 3, 2])
    assert torch.equal(cyclic_shift(shifted, (3, 2), reverse=True), x)
    padded = pad_map(x, (5, 3))
    assert padded.shape == (1, 14, 14, 2) and torch.equal(padded[:, :9, :11], x) and padded[:, 9:].abs().sum() == 0


def test_nine_regions_and_mask():
    labels = region_labels(14, 14, (7, 7), (3, 3))
    assert labels.unique().tolist() == list(range(9))
    assert labels[0, 0] == 0 and labels[13, 13] == 8 and labels[8, 0] == 3 and labels[12, 0] == 6
    mask = shift_mask(14, 14, (7, 7), (3, 3))
    assert mask.shape == (4, 49, 49)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    assert set(mask.unique().tolist()) == {0.0, MASK_FILL}
    last = mask[3]  # bottom-right window: four regions of 4x4, 4x3, 3x4, 3x3 tokens
    assert (last == 0).sum() == 16 * 16 + 12 * 12 + 12 * 12 + 9 * 9
    assert shift_mask(14, 14, (7, 7), (0, 0)) is None
    one_axis = region_labels(7, 14, (7, 7), (0, 3))  # torchvision's per-axis shift
    assert one_axis[:, 0].unique().tolist() == [0] and one_axis[0].unique().tolist() == [0, 1, 2]


def test_geometry_rules():
    # clamp (official / timm / HF): a map that fits one window gets a window of its side, no shift
    assert window_geometry(56, 56, 7, 3) == ((7, 7), (3, 3), (0, 0))
    assert window_geometry(13, 20, 7, 3) == ((7, 7), (3, 3), (1, 1))
    assert window_geometry(7, 10, 7, 3) == ((7, 7), (0, 0), (0, 4))
    assert window_geometry(4, 6, 7, 3) == ((4, 4), (0, 0), (0, 2))
    # pad (torchvision): window kept, map padded, shift off per axis the window covers
    assert window_geometry(7, 10, 7, 3, "pad") == ((7, 7), (0, 3), (0, 4))
    assert window_geometry(4, 6, 7, 3, "pad") == ((7, 7), (0, 0), (3, 1))
    # pad_shift (OpenMMLab: mmdetection; mmpretrain / mmsegmentation with pad_small_map=True): window and shift kept
    assert window_geometry(56, 56, 7, 3, "pad_shift") == ((7, 7), (3, 3), (0, 0))
    assert window_geometry(7, 10, 7, 3, "pad_shift") == ((7, 7), (3, 3), (0, 4))
    assert window_geometry(4, 6, 7, 3, "pad_shift") == ((7, 7), (3, 3), (3, 1))
    assert window_geometry(1, 1, 7, 0, "pad_shift") == ((7, 7), (0, 0), (6, 6))  # regular blocks stay unshifted
    with pytest.raises(ValueError, match="small_map"):
        window_geometry(7, 7, 7, 3, "shrink")


def mmdet_style_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """The mask as mmdetection's ShiftWindowMSA builds it, written independently of windows.py:
    label the padded map by the slices [0, -M), [-M, -s), [-s, None) per axis, then compare labels
    inside each window. (nW, N, N) with 0 / MASK_FILL."""
    img = torch.zeros(height, width)
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for h in slices:
        for w in slices:
            img[h, w] = count
            count += 1
    windows = img.view(height // window, window, width // window, window).permute(0, 2, 1, 3).reshape(-1, window**2)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, MASK_FILL, 0.0)


@pytest.mark.parametrize("height,width", [(7, 7), (7, 14), (14, 7), (14, 21)])
def test_shift_mask_of_a_kept_shift_is_mmdetections(height, width):
    """pad_shift keeps the shift on maps padded to one window: the mask is mmdetection's, whose first slice
    [0, -M) is then empty, so a one-window map still splits into 2 x 2 regions (labels 4, 5, 7, 8)."""
    ours = shift_mask(height, width, (7, 7), (3, 3))
    assert torch.equal(ours, mmdet_style_mask(height, width, 7, 3))
    if (height, width) == (7, 7):
        assert ours.shape == (1, 49, 49)
        assert region_labels(7, 7, (7, 7), (3, 3)).unique().tolist() == [4, 5, 7, 8]
        assert (ours[0] == 0).sum() == 16 * 16 + 12 * 12 + 12 * 12 + 9 * 9  # regions of 4x4, 4x3, 3x4, 3x3 tokens


def test_relative_position_index():
    index = relative_position_index((7, 7))
    assert index.shape == (49, 49) and index.min() == 0 and index.max() == 13 * 13 - 1
    assert torch.all(index.diagonal() == 6 * 13 + 6)  # zero offset is the table's centre
    assert index[0, 48] == 0 and index[48, 0] == 168  # token 0 vs token 48: offset (-6, -6); reversed (6, 6)
    small = relative_position_index((3, 3), table_window=(7, 7))  # a clamped window reads the same offsets
    assert torch.all(small.diagonal() == 6 * 13 + 6) and small.max() == (6 + 2) * 13 + 6 + 2


def test_log_spaced_coords():
    coords = log_spaced_coords((8, 8))
    assert coords.shape == (15 * 15, 2)
    log9 = torch.log2(torch.tensor(9.0)) / 3  # |offset| = window - 1 normalises to 1, then log2(8 + 1) / log2(8)
    assert torch.allclose(coords.abs().max(), log9)
    assert torch.allclose(coords[0], -log9.expand(2))
    pretrained = log_spaced_coords((16, 16), (8, 8))  # fine-tuned at a larger window: wider range
    assert pretrained.abs().max() > coords.abs().max()


def test_resize_bias_table():
    table = torch.randn(13 * 13, 3)
    assert resize_bias_table(table, (7, 7), (7, 7)) is table
    resized = resize_bias_table(table, (7, 7), (12, 12))
    assert resized.shape == (23 * 23, 3)
    constant = torch.full((13 * 13, 2), 0.5)
    assert torch.allclose(resize_bias_table(constant, (7, 7), (12, 12)), torch.full((23 * 23, 2), 0.5))
    assert table_window(23 * 23) == 12
    with pytest.raises(ValueError):
        table_window(100)


@pytest.mark.parametrize("policy", ["clamp", "pad", "pad_shift"])
@pytest.mark.parametrize("size", [(14, 14), (21, 14), (10, 23), (7, 7), (5, 9), (56, 56)])
def test_window_order_is_the_roll_and_partition_as_one_permutation(policy, size):
    from swinx.model.windows import (
        cyclic_shift,
        pad_map,
        window_geometry,
        window_order,
        window_partition,
        window_reverse,
    )

    torch.manual_seed(0)
    x = torch.randn(2, *size, 5)
    geometry = window_geometry(*size, 7, 3, policy)
    padded = pad_map(x, geometry.pad)
    Hp, Wp = padded.shape[1:3]
    gather, scatter = window_order(Hp, Wp, geometry)
    expected = window_partition(cyclic_shift(padded, geometry.shift), geometry.window)
    N = geometry.window[0] * geometry.window[1]
    windows = padded.reshape(2, -1, 5).index_select(1, gather).view(2, -1, N, 5)
    assert torch.equal(windows, expected)
    back = windows.reshape(2, -1, 5).index_select(1, scatter).view(2, Hp, Wp, 5)
    assert torch.equal(back, padded)
    assert torch.equal(back, cyclic_shift(window_reverse(expected, geometry.window, Hp, Wp), geometry.shift, True))
