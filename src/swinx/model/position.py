"""Relative position bias: the index, V2's log-spaced coordinates, and resizing pretrained tables."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def relative_position_index(
    window: tuple[int, int], table_window: tuple[int, int] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """(N, N) long index of each token pair of a window into a (2Mh - 1) * (2Mw - 1) bias table.

    Token pair (i, j) with offset (dy, dx) reads entry (dy + Mh - 1) * (2Mw - 1) + (dx + Mw - 1).
    `table_window` (M) defaults to `window`; a smaller window (a map clamped to fewer tokens
    than the table was trained for) reads the central entries, i.e. the same offsets.
    """
    mh, mw = table_window or window
    ys, xs = torch.meshgrid(
        torch.arange(window[0], device=device), torch.arange(window[1], device=device), indexing="ij"
    )
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (offsets[0] + mh - 1) * (2 * mw - 1) + (offsets[1] + mw - 1)


def log_spaced_coords(
    window: tuple[int, int],
    pretrained_window: tuple[int, int] = (0, 0),
    device: torch.device | None = None,
    scale_window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """V2 continuous position coordinates, ((2wh - 1) * (2ww - 1), 2), rows (dy, dx) in table order.

    Offsets are normalised by the pretrained window (or the window itself, or
    `scale_window` when given) so that a model fine-tuned at a larger window sees the
    pretrained range at [-1, 1], then spread logarithmically: sign(x) * log2(8|x| + 1) / log2(8).
    """
    axes = []
    for w, p, n in zip(window, pretrained_window, scale_window or window):
        offsets = torch.arange(-(w - 1), w, dtype=torch.float32, device=device)
        scale = p - 1 if p > 0 else n - 1
        # A one-token window has offset 0 only: divide by 1. (sym_max: no guard on a symbolic size.)
        axes.append(offsets / (torch.sym_max(scale, 1) if isinstance(scale, torch.SymInt) else max(scale, 1)))
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) * 8  # (2wh-1, 2ww-1, 2)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.reshape(-1, 2)


def resize_bias_table(table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a V1 bias table ((2M-1)^2, heads) to another window, as the official fine-tuning does."""
    if tuple(old_window) == tuple(new_window):
        return table
    heads = table.shape[1]
    old = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    grid = table.float().T.reshape(1, heads, *old)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return grid.reshape(heads, -1).T.contiguous().to(table.dtype)


def table_window(table_rows: int) -> int:
    """The window M of a square bias table with (2M - 1)^2 rows."""
    side = math.isqrt(table_rows)
    if side * side != table_rows or side % 2 == 0:
        raise ValueError(f"a relative position bias table has (2M-1)^2 rows; {table_rows} is not of that form")
    return (side + 1) // 2
