"""Window geometry as pure functions on channels-last maps (B, H, W, C).

Nothing here owns parameters: the blocks call these functions, and the same
functions draw the pictures and build the exported buffers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

SMALL_MAP_POLICIES = ("clamp", "pad", "pad_shift")

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
    "pad_shift" (OpenMMLab: mmdetection's Swin, mmpretrain / mmsegmentation with
    `pad_small_map=True`): the window never changes, the map is padded up to it, and the
    shift is kept whatever the size. A padded map of exactly one window then still has a
    shift mask: along each axis its rows split into [0, M - s) and [M - s, M) (the first of
    the nine regions is empty), as mmdetection's mask over the padded map's slices gives.

    Written without branches on the sizes (min, max and products instead of `if`), so that
    an exported graph with symbolic height and width computes the geometry of every input
    size itself, switching windows and shifts on and off as the eager model does.
    """
    if small_map == "clamp":
        side = _min(height, width)
        shift = shift * _positive(side - window)  # no shift when one window covers the shorter side
        window = _min(side, window)
        pad = (round_up(height, window) - height, round_up(width, window) - width)
        return WindowGeometry((window, window), (shift, shift), pad)
    if small_map == "pad":
        pad = (round_up(height, window) - height, round_up(width, window) - width)
        # The padded size is a multiple of the window, so it exceeds the window iff the size does.
        shifts = (shift * _positive(height - window), shift * _positive(width - window))
        return WindowGeometry((window, window), shifts, pad)
    if small_map == "pad_shift":
        pad = (round_up(height, window) - height, round_up(width, window) - width)
        return WindowGeometry((window, window), (shift, shift), pad)
    raise ValueError(f"small_map must be one of {SMALL_MAP_POLICIES}, got {small_map!r}")


def _symbolic(*values) -> bool:
    return any(isinstance(v, torch.SymInt) for v in values)


def _min(a: int, b: int) -> int:
    """min(a, b); symbolic (torch.export, torch.compile) without a guard."""
    return torch.sym_min(a, b) if _symbolic(a, b) else min(a, b)


def _positive(n: int) -> int:
    """1 if n > 0 else 0; symbolic without a guard. (jit.trace gives tensor sizes: plain Python.)"""
    if _symbolic(n):
        return torch.sym_min(1, torch.sym_max(0, n))
    return 1 if n > 0 else 0


def ceil_div(size: int, divisor: int) -> int:
    """ceil(size / divisor) for size >= 0, divisor > 0, in integer arithmetic.

    Written with non-negative operands only: torch.onnx turns a symbolic floor division
    into ONNX's truncating Div, which rounds -(-n // m) the wrong way.
    """
    return (size + divisor - 1) // divisor


def round_up(size: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= size (a ceiling division, not %, so that symbolic
    sizes under torch.compile give padded sizes the shape checker can simplify)."""
    return ceil_div(size, multiple) * multiple


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


def window_order(height: int, width: int, geometry: WindowGeometry, device: torch.device | None = None):
    """(gather, scatter): roll by -shift and window partition of a padded (height, width) map as one
    permutation of its tokens, and the inverse (window reverse and roll back).

    `map.reshape(B, H * W, C).index_select(1, gather)` lists the tokens window by window, as
    `window_partition(cyclic_shift(map, shift), window)` does; `index_select(1, scatter)` on the
    windows' tokens puts them back. One copy each way instead of the roll's two (one per axis) and
    the partition's one.
    """
    positions = torch.arange(height * width, device=device).view(1, height, width, 1)
    gather = window_partition(cyclic_shift(positions, geometry.shift), geometry.window).reshape(-1)
    scatter = torch.empty_like(gather)
    scatter[gather] = torch.arange(gather.numel(), device=device)
    return gather, scatter


class _PermuteTokens(torch.autograd.Function):
    """x.index_select(1, order) whose gradient is the inverse gather (index_select's own is a slower index_add)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, C) with token i taken from order[i]; `inverse` is order's inverse permutation."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteTokens.apply(x, order, inverse)
    return x.index_select(1, order)


def region_labels(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
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


def shift_mask(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor | None:
    """Additive attention mask (nW, N, N) for a padded (height, width) map, or None without shift.

    Pairs of tokens from different regions get MASK_FILL, pairs from the same region 0.
    """
    if shift[0] == 0 and shift[1] == 0:
        return None
    labels = region_labels(height, width, window, shift, device)
    labels = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    different = labels[:, :, None] != labels[:, None, :]  # (nW, N, N)
    return different.float() * MASK_FILL


class WindowIndex(NamedTuple):
    """Pad, roll and partition of one block as index arithmetic, for graphs with symbolic sizes.

    Every window gets M x M slots (M the nominal window); a clamped window of w < M tokens
    fills the top-left w x w slots and leaves the rest unused. The map is flattened and one
    zero token appended (the padding), so that `gather` builds the windows and `scatter`
    reads each token's output back with no shape that depends on the sizes other than
    the window count.
    """

    gather: torch.Tensor  # (nW * M * M,) source of each slot in the flattened map + a zero token (nW counts the spare)
    scatter: torch.Tensor  # (H * W,) slot of each token in the flattened windows
    labels: torch.Tensor  # (nW, M * M) shifted region of each slot: different labels may not attend
    used: torch.Tensor  # (M * M,) bool: the slot lies inside the (clamped) window
    num_windows: int
    window: int  # the window actually used (M, or the clamped w)


def window_index(
    height: int, width: int, window: int, shift: int, small_map: str = "clamp", device: torch.device | None = None
) -> WindowIndex:
    """The `WindowIndex` of a block with nominal `window` and `shift` on an (height, width) map.

    Equivalent to pad_map, cyclic_shift, window_partition and region_labels with
    `window_geometry`'s choices, including the clamp, pad and pad_shift rules for small maps
    (pad_shift on a one-window map: the region formula below gives labels 1 and 2 per axis,
    region 0 being empty, as in `region_labels`).
    """
    geometry = window_geometry(height, width, window, shift, small_map)
    w, (sh, sw), M = geometry.window[0], geometry.shift, window
    rows, cols = ceil_div(height, w), ceil_div(width, w)  # windows along each axis
    Hp, Wp = rows * w, cols * w  # the padded map
    slots = M * M
    # One spare window at the end, all padding: a window count of 1 (a small last stage) would
    # otherwise be a special case that symbolic shape checks specialise the exported graph on.
    num_windows = rows * cols + 1
    k = torch.arange(num_windows * slots, device=device)
    win, slot = k // slots, k % slots
    i, j = slot // M, slot % M
    r, c = (win // cols) * w + i, _mod(win, cols) * w + j  # the slot's place in the rolled, padded map
    pr, pc = _mod(r + sh, Hp), _mod(c + sw, Wp)  # where the roll by -shift took it from
    real = (i < w) & (j < w) & (pr < height) & (pc < width) & (win < rows * cols)
    gather = torch.where(real, pr * width + pc, height * width)
    # The nine regions live in rolled coordinates: [0, L - w), [L - w, L - s), [L - s, L) per axis.
    labels = (((r >= Hp - w).long() + (r >= Hp - sh).long()) * 3 + (c >= Wp - w).long() + (c >= Wp - sw).long()).view(
        num_windows, slots
    )
    r0, c0 = torch.arange(height, device=device)[:, None], torch.arange(width, device=device)[None, :]
    rr, rc = _mod(r0 - sh, Hp), _mod(c0 - sw, Wp)
    scatter = ((rr // w) * cols + rc // w) * slots + _mod(rr, w) * M + _mod(rc, w)
    first = torch.arange(slots, device=device)
    used = (first // M < w) & (first % M < w)
    return WindowIndex(gather, scatter.reshape(-1), labels, used, num_windows, w)


def _mod(a: torch.Tensor, n: int) -> torch.Tensor:
    """a % n for n > 0, by floor division: the ONNX exporter cannot take a symbolic n in `%`."""
    return a - (a // n) * n
