"""Window geometry as pure functions on channels-last maps (B, H, W, C).

Nothing here owns parameters: the blocks call these functions, and the same
functions draw the pictures and build the exported buffers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

SMALL_MAP_POLICIES = ("clamp", "pad")

# The official code fills masked pairs with -100 rather than -inf: a fully
# masked row (impossible here, but cheap insurance) then stays finite, and every
# reference implementation reproduces the same softmax only with this value.
MASK_FILL = -100.0


class WindowGeometry(NamedTuple):
    """How one block cuts an (H, W) map: window and shift per axis, and the padding."""

    window: tuple[int, int]
    shift: tuple[int, int]
    pad: tuple[int, int]  # rows added at the bottom, columns added at the right

    @property
    def has_shift(self) -> bool:
        return self.shift[0] > 0 or self.shift[1] > 0


def window_geometry(height: int, width: int, window: int, shift: int, small_map: str = "clamp") -> WindowGeometry:
    """Window, shift and padding of a block with nominal `window` and `shift` on an (height, width) map.

    "clamp" (official, timm, Hugging Face): a map that fits in one window along its
    shorter side gets a square window of that side and no shift.
    "pad" (torchvision): the window never changes; the map is padded up to it, and the
    shift turns off along each axis whose padded size the window already covers.
    """
    if small_map == "clamp":
        if min(height, width) <= window:
            window, shift = min(height, width), 0
        pad = (round_up(height, window) - height, round_up(width, window) - width)
        geometry = WindowGeometry((window, window), (shift, shift), pad)
    elif small_map == "pad":
        pad = (round_up(height, window) - height, round_up(width, window) - width)
        shifts = tuple(0 if window >= size + p else shift for size, p in zip((height, width), pad))
        geometry = WindowGeometry((window, window), shifts, pad)
    else:
        raise ValueError(f"small_map must be one of {SMALL_MAP_POLICIES}, got {small_map!r}")
    return geometry


def round_up(size: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= size.

    Written as a ceiling division, not with %, so that a symbolic size (torch.compile with
    dynamic shapes) gives padded sizes the shape checker can simplify.
    """
    return -(-size // multiple) * multiple


def pad_map(x: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the bottom and right."""
    # Compiled with dynamic shapes, testing pad == 0 would add a guard on the input size (and a
    # recompilation for each new size); padding by zero costs a copy and keeps one graph.
    if not torch.compiler.is_compiling() and pad[0] == 0 and pad[1] == 0:
        return x
    return F.pad(x, (0, 0, 0, pad[1], 0, pad[0]))


def cyclic_shift(x: torch.Tensor, shift: tuple[int, int], reverse: bool = False) -> torch.Tensor:
    """Roll a (B, H, W, C) map by -shift (or +shift when reversing) on both spatial axes."""
    if shift[0] == 0 and shift[1] == 0:
        return x
    sign = 1 if reverse else -1
    return torch.roll(x, shifts=(sign * shift[0], sign * shift[1]), dims=(1, 2))


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B, nW, wh * ww, C), windows in row-major order."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (H // wh) * (W // ww), wh * ww, C)  # (B, nW, N, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """(B, nW, wh * ww, C) -> (B, height, width, C); the inverse of `window_partition`."""
    B, _, _, C = windows.shape
    wh, ww = window
    x = windows.view(B, height // wh, width // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, height, width, C)


def region_labels(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                  device: torch.device | None = None) -> torch.Tensor:
    """(height, width) long map of the nine shifted regions, labelled 0..8 (row region * 3 + column region).

    Along an axis the regions are [0, L - window), [L - window, L - shift), [L - shift, L):
    after the roll, tokens from the last region sit next to tokens from the first one
    although they were far apart in the image. An axis without shift is one region.
    """
    def axis_labels(length: int, w: int, s: int) -> torch.Tensor:
        idx = torch.arange(length, device=device)
        if s == 0:
            return torch.zeros_like(idx)
        return (idx >= length - w).long() + (idx >= length - s).long()

    rows = axis_labels(height, window[0], shift[0])
    cols = axis_labels(width, window[1], shift[1])
    return rows[:, None] * 3 + cols[None, :]


def shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
               device: torch.device | None = None) -> torch.Tensor | None:
    """Additive attention mask (nW, N, N) for a padded (height, width) map, or None without shift.

    Pairs of tokens from different regions get MASK_FILL, pairs from the same region 0.
    """
    if shift[0] == 0 and shift[1] == 0:
        return None
    labels = region_labels(height, width, window, shift, device)
    labels = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    different = labels[:, :, None] != labels[:, None, :]  # (nW, N, N)
    return different.float() * MASK_FILL
