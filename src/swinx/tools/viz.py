"""Pictures of the inside of a Swin Transformer: window grids, shift masks, attention, position bias, a summary.

The back end of `swinx viz`. Each picture has two halves: a function that returns the numbers
(`stage_layouts`, `window_kinds`, `block_attention`, `bias_images`, `model_summary`), which the
tests check against the model, and a `draw_*` function that writes them as a PNG through
matplotlib's Agg canvas (no pyplot, no change to the global backend). matplotlib is imported
only when a picture is drawn, so `import swinx` stays light.

Stages are numbered from 1, as in the paper and in `swinx flops` (stage1..4); blocks, heads
and token positions from 0, as Python indexes them (`model.layers[stage - 1].blocks[block]`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from swinx.model.config import SwinConfig
from swinx.model.windows import (
    WindowGeometry,
    ceil_div,
    cyclic_shift,
    region_labels,
    window_geometry,
    window_partition,
    window_reverse,
)

__all__ = [
    "BlockAttention",
    "StageLayout",
    "WindowKind",
    "bias_images",
    "block_attention",
    "draw_attention",
    "draw_bias",
    "draw_mask",
    "draw_model",
    "draw_windows",
    "load_image",
    "model_summary",
    "stage_layouts",
    "window_kinds",
]

# Nine region colours (tab10 without its grey), shared by the window and mask pictures.
REGION_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
_ATTENTION_CMAP = "inferno"
_MAX_PNG_BYTES = 250_000


# ---------------------------------------------------------------------------------------------
# Inputs: models, sizes, images, indices


def _config(model) -> SwinConfig:
    """A SwinConfig from a variant name, a config or a model."""
    if isinstance(model, str):
        from swinx.model.variants import get_config

        return get_config(model)
    if isinstance(model, SwinConfig):
        return model
    config = getattr(model, "config", None)
    if isinstance(config, SwinConfig):
        return config
    raise TypeError(f"expected a variant name, a SwinConfig or a SwinTransformer, got {type(model).__name__}")


def _size(size, default: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return tuple(default)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    return int(h), int(w)


def load_image(path: str | os.PathLike, channels: int = 3, size: tuple[int, int] | None = None):
    """An image file as a PIL image in "RGB" (or "L" for channels=1), optionally resized to (H, W).

    Raises ValueError("cannot read image PATH: ...") for a missing or undecodable file.
    """
    from swinx.classification import data as D

    try:
        image = D.open_image(path, channels)
    except FileNotFoundError:
        raise ValueError(f"cannot read image {path}: file does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"cannot read image {path}: it is a directory") from None
    except D.READ_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if size is not None:
        from PIL import Image

        h, w = _size(size, (0, 0))
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    return image


def _as_image(image, channels: int = 3, size=None):
    """A path, PIL image or (H, W[, C]) uint8 array as a PIL image."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image, channels, size)
    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None:
        h, w = _size(size, (0, 0))
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    return image


def _check_stage(config: SwinConfig, stage: int) -> int:
    n = len(config.depths)
    if not isinstance(stage, int) or not 1 <= stage <= n:
        stages = "only stage 1" if n == 1 else f"stages 1-{n}"
        raise ValueError(f"stage {stage} does not exist: this model has {stages} (numbered from 1, as in the paper)")
    return stage


def _check_block(config: SwinConfig, stage: int, block: int) -> int:
    _check_stage(config, stage)
    depth = config.depths[stage - 1]
    if not isinstance(block, int) or not 0 <= block < depth:
        raise ValueError(f"block {block} does not exist: stage {stage} of this model has {_indices('block', depth)}")
    return block


def _check_head(config: SwinConfig, stage: int, head: int) -> int:
    heads = config.num_heads[stage - 1]
    if not isinstance(head, int) or not 0 <= head < heads:
        raise ValueError(f"head {head} does not exist: stage {stage} of this model has {_indices('head', heads)}")
    return head


def _indices(what: str, n: int) -> str:
    return f"only {what} 0" if n == 1 else f"{what}s 0-{n - 1}"


# ---------------------------------------------------------------------------------------------
# Numbers


@dataclass(frozen=True)
class StageLayout:
    """How one stage cuts its token map, for an image of a given size.

    `height` x `width` tokens of `token` x `token` pixels each; `regular` is the geometry of
    the even blocks (no shift), `shifted` that of the odd blocks (shift window // 2, which the
    small-map rule may turn off).
    """

    stage: int
    height: int
    width: int
    token: int
    window_size: int
    regular: WindowGeometry
    shifted: WindowGeometry

    def geometry(self, block: int) -> WindowGeometry:
        return self.regular if block % 2 == 0 else self.shifted

    @property
    def padded(self) -> tuple[int, int]:
        return self.height + self.regular.pad[0], self.width + self.regular.pad[1]

    def window_counts(self, block: int = 0) -> tuple[int, int]:
        g = self.geometry(block)
        return self.padded[0] // g.window[0], self.padded[1] // g.window[1]


def stage_layouts(config: SwinConfig, img_size: int | tuple[int, int] | None = None) -> list[StageLayout]:
    """One StageLayout per stage for an (H, W) image (default: the config's size).

    Stage i's map is ceil(H / patch / 2**(i-1)): the patch embedding and every patch
    merging pad their input to a multiple of 2 (of the patch) at the bottom and right.
    """
    H, W = _size(img_size, config.img_hw)
    p, M = config.patch_size, config.window_size
    h, w = ceil_div(H, p), ceil_div(W, p)
    layouts = []
    for i in range(len(config.depths)):
        if i:
            h, w = ceil_div(h, 2), ceil_div(w, 2)
        layouts.append(
            StageLayout(
                i + 1,
                h,
                w,
                p * 2**i,
                M,
                window_geometry(h, w, M, 0, config.small_map),
                window_geometry(h, w, M, M // 2, config.small_map),
            )
        )
    return layouts


@dataclass(frozen=True)
class WindowKind:
    """One kind of window of a shifted block: where it sits and which token pairs its mask allows."""

    name: str  # "interior", "last column", "last row" or "bottom-right corner"
    index: tuple[int, int]  # window row and column in the rolled map
    flat: int  # index into the nW axis of the mask and the attention
    labels: torch.Tensor  # (N,) region label of each token, row-major inside the window
    allowed: torch.Tensor  # (N, N) bool: query i may attend to key j


def window_kinds(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> list[WindowKind]:
    """The distinct windows of a shifted block on a padded (height, width) map.

    Windows away from the last row and column hold one region (all pairs allowed); the last
    column, the last row and the corner mix regions that the roll brought together.
    """
    labels = region_labels(height, width, window, shift)
    per_window = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    rows, cols = height // window[0], width // window[1]
    names = {
        (False, False): "interior",
        (False, True): "last column",
        (True, False): "last row",
        (True, True): "bottom-right corner",
    }
    kinds, seen = [], set()
    for r, c in ((0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1)):
        key = (r == rows - 1, c == cols - 1)
        if key in seen:
            continue
        seen.add(key)
        flat = r * cols + c
        lab = per_window[flat]
        kinds.append(WindowKind(names[key], (r, c), flat, lab, lab[:, None] == lab[None, :]))
    return kinds


@dataclass
class BlockAttention:
    """The attention of one block on one image, and how to put it back on the image.

    `attn` is (heads, nW, N, N) in the block's own coordinates: the map padded at the
    bottom/right to a multiple of the window, rolled by -shift, cut into windows in row-major
    order. The maps returned below are in token coordinates of the stage's (height, width)
    map (or of the padded map, unrolled, with padded=True).
    """

    attn: torch.Tensor
    height: int
    width: int
    geometry: WindowGeometry
    stage: int
    block: int
    token: int
    logits: torch.Tensor | None = None

    @property
    def padded(self) -> tuple[int, int]:
        return self.height + self.geometry.pad[0], self.width + self.geometry.pad[1]

    @property
    def heads(self) -> int:
        return self.attn.shape[0]

    def _unwindow(self, values: torch.Tensor, padded: bool) -> torch.Tensor:
        """(heads, nW, N) in window coordinates -> (heads, H, W) on the map (or the padded map)."""
        grid = window_reverse(values.permute(1, 2, 0)[None], self.geometry.window, *self.padded)  # (1, Hp, Wp, heads)
        grid = cyclic_shift(grid, self.geometry.shift, reverse=True)[0].permute(2, 0, 1)
        return grid if padded else grid[:, : self.height, : self.width]

    def locate(self, row: int, col: int) -> tuple[int, int]:
        """(window, token) of map position (row, col) in the block's windows."""
        self.check_query(row, col)
        (wh, ww), (sh, sw) = self.geometry.window, self.geometry.shift
        Hp, Wp = self.padded
        r, c = (row - sh) % Hp, (col - sw) % Wp
        return (r // wh) * (Wp // ww) + c // ww, (r % wh) * ww + c % ww

    def check_query(self, row: int, col: int) -> None:
        if not (0 <= row < self.height and 0 <= col < self.width):
            raise ValueError(
                f"query ({row}, {col}) is outside stage {self.stage}'s {self.height}x{self.width} "
                f"token map: rows 0-{self.height - 1}, columns 0-{self.width - 1}"
            )

    def query_map(self, row: int, col: int, padded: bool = False) -> torch.Tensor:
        """(heads, H, W): how much the query at map position (row, col) attends to each token.

        Zero outside the query's window (and, in a shifted block, outside its region); sums to
        1 over the padded map, and over the map when the window holds no padding.
        """
        window, token = self.locate(row, col)
        values = torch.zeros(self.attn.shape[:3], dtype=self.attn.dtype)
        values[:, window] = self.attn[:, window, token]
        return self._unwindow(values, padded)

    def real_tokens(self) -> torch.Tensor:
        """(nW, N) bool: which window tokens are map tokens (not padding)."""
        Hp, Wp = self.padded
        real = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool)
        real[:, : self.height, : self.width] = True
        return window_partition(cyclic_shift(real, self.geometry.shift), self.geometry.window)[0, :, :, 0]

    def received_map(self, padded: bool = False) -> torch.Tensor:
        """(heads, H, W): for each token, the mean attention it receives from the (non-padding)
        queries of its window. Sums to 1 over each window."""
        real = self.real_tokens().to(self.attn.dtype)  # (nW, N)
        weights = real / real.sum(-1, keepdim=True).clamp(min=1)
        values = torch.einsum("wq,hwqk->hwk", weights, self.attn)
        return self._unwindow(values, padded)

    def window_rects(self, row: int, col: int) -> list[tuple[int, int, int, int]]:
        """The query's window as (row0, row1, col0, col1) token rectangles of the unrolled padded
        map: one, or two or four when the window wraps around the roll."""
        window, _ = self.locate(row, col)
        (wh, ww), (sh, sw) = self.geometry.window, self.geometry.shift
        Hp, Wp = self.padded
        wr, wc = divmod(window, Wp // ww)
        return [
            (r0, r1, c0, c1) for r0, r1 in _wrapped(wr * wh + sh, wh, Hp) for c0, c1 in _wrapped(wc * ww + sw, ww, Wp)
        ]


def _wrapped(start: int, length: int, period: int) -> list[tuple[int, int]]:
    start %= period
    end = start + length
    return [(start, end)] if end <= period else [(start, period), (0, end - period)]


def _block(model, stage: int, block: int):
    config = _config(model)
    _check_block(config, stage, block)
    return model.layers[stage - 1].blocks[block]


@torch.no_grad()
def block_attention(model, x: torch.Tensor, stage: int, block: int) -> BlockAttention:
    """Run `model` on one normalised image x (1, C, H, W) and return block `block` of stage `stage`'s attention."""
    config = _config(model)
    target = _block(model, stage, block)
    if x.dim() == 3:
        x = x[None]
    if x.shape[0] != 1:
        raise ValueError(f"block_attention takes one image, got a batch of {x.shape[0]}")
    seen = {}
    handle = target.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        handle.remove()
        model.train(was_training)
    tokens = seen["x"]  # (1, H, W, C)
    inp = target.norm1(tokens) if target.version == 1 else tokens
    _, attn = target.window_attention(inp, return_attn=True)
    H, W = tokens.shape[1:3]
    geometry = window_geometry(H, W, target.window_size, target.shift_size, target.small_map)
    return BlockAttention(
        attn[0].float().cpu().transpose(0, 1).contiguous(),
        H,
        W,
        geometry,
        stage,
        block,
        config.patch_size * 2 ** (stage - 1),
        logits[0].float().cpu(),
    )


@torch.no_grad()
def bias_images(attn_module, window: int | None = None) -> torch.Tensor:
    """(heads, 2M-1, 2M-1) relative position bias by offset: [h, dy + M - 1, dx + M - 1].

    dy, dx are the query's position minus the key's. V1 reads the learned table; V2 evaluates
    16 * sigmoid(cpb_mlp(log-spaced offsets)) for the window M (default: the module's).
    """
    from swinx.model.position import log_spaced_coords

    M = window or attn_module.window_size
    if attn_module.version == 1:
        table = attn_module.relative_position_bias_table
        side = math.isqrt(table.shape[0])
        if window not in (None, (side + 1) // 2):
            raise ValueError(f"a V1 table is learned for window {(side + 1) // 2}, not {window}")
        M = (side + 1) // 2
    else:
        pretrained = (attn_module.pretrained_window_size,) * 2
        table = 16 * torch.sigmoid(
            attn_module.cpb_mlp(log_spaced_coords((M, M), pretrained, attn_module.proj.weight.device))
        )
    return table.detach().float().cpu().T.reshape(-1, 2 * M - 1, 2 * M - 1)


def _parameter_counts(config: SwinConfig) -> dict[str, int]:
    from swinx.model.swin import SwinTransformer

    with torch.device("meta"):
        model = SwinTransformer(config)
    count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0
    counts = {
        "patch_embed": count(model.patch_embed)
        + (model.absolute_pos_embed.numel() if model.absolute_pos_embed is not None else 0)
    }
    for i, stage in enumerate(model.layers):
        counts[f"stage{i + 1}"] = count(stage)
    counts["head"] = count(model.norm) + count(model.head)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _shift_pattern(layout: StageLayout, depth: int) -> list[str]:
    return ["SW" if layout.geometry(j).has_shift else "W" for j in range(depth)]


def _summary_rows(config: SwinConfig, img_size) -> tuple[tuple[int, int], list[dict]]:
    from swinx.tools.flops import macs

    size = _size(img_size, config.img_hw)
    parts = {p.name: p for p in macs(config, size)}
    params = _parameter_counts(config)
    layouts = stage_layouts(config, size)
    rows = [
        dict(
            part="patch_embed",
            map=(parts["patch_embed"].height, parts["patch_embed"].width),
            channels=f"{config.in_chans}->{config.embed_dim}",
            params=params["patch_embed"],
            macs=parts["patch_embed"].macs,
            note=f"{config.patch_size}x{config.patch_size} patches",
        )
    ]
    for layout, depth, heads in zip(layouts, config.depths, config.num_heads):
        name = f"stage{layout.stage}"
        g = layout.regular
        dim = config.embed_dim * 2 ** (layout.stage - 1)
        rows.append(
            dict(
                part=name,
                map=(layout.height, layout.width),
                padded=layout.padded,
                window=g.window,
                windows=layout.window_counts(0),
                blocks=_shift_pattern(layout, depth),
                shift=layout.shifted.shift,
                channels=str(dim),
                heads=heads,
                params=params[name],
                macs=parts[name].macs,
                merge=layout.stage < len(config.depths),
            )
        )
    rows.append(
        dict(
            part="head",
            channels=f"{config.num_features}->{config.num_classes}",
            params=params["head"],
            macs=parts["head"].macs,
            note="norm+pool+fc",
        )
    )
    return size, rows + [dict(part="total", params=params["total"], macs=sum(p.macs for p in parts.values()))]


def _hw(hw) -> str:
    return f"{hw[0]}x{hw[1]}"


def model_summary(config, img_size: int | tuple[int, int] | None = None, name: str | None = None) -> str:
    """A text table: per part, the token map, padding, windows, shift per block, channels, heads,
    parameters and GMACs (official convention: multiply-accumulates), at `img_size` (default: the config's).

    `config` may also be a variant name or a model.
    """
    if name is None and isinstance(config, str):
        name = config
    config = _config(config)
    size, rows = _summary_rows(config, img_size)
    total = rows[-1]
    head = (
        f"{name or 'model'}: Swin Transformer V{config.version} at {_hw(size)} (patch {config.patch_size}, "
        f"window {config.window_size}, small maps: {config.small_map})\n"
        f"{total['params']:,} parameters, {total['macs'] / 1e9:.2f} GMACs "
        '(multiply-accumulates, the official "FLOPs")\n'
    )
    cols = (
        f"{'part':12s} {'tokens':>9s} {'padded':>9s} {'window':>6s} {'windows':>10s} {'channels':>10s} "
        f"{'heads':>5s}  {'blocks':14s} {'params':>12s} {'GMACs':>7s}"
    )
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        if r["part"] == "total":
            lines.append("-" * len(cols))
            lines.append(
                f"{'total':12s} {'':>9s} {'':>9s} {'':>6s} {'':>10s} {'':>10s} {'':>5s}  {'':14s} "
                f"{r['params']:>12,d} {r['macs'] / 1e9:7.3f}"
            )
        elif r["part"].startswith("stage"):
            windows = f"{r['windows'][0]}x{r['windows'][1]}={r['windows'][0] * r['windows'][1]}"
            window = str(r["window"][0]) if r["window"][0] == r["window"][1] else _hw(r["window"])
            lines.append(
                f"{r['part']:12s} {_hw(r['map']):>9s} {_hw(r['padded']):>9s} {window:>6s} {windows:>10s} "
                f"{r['channels']:>10s} {r['heads']:>5d}  {' '.join(r['blocks']):14s} {r['params']:>12,d} "
                f"{r['macs'] / 1e9:7.3f}"
            )
        else:
            tokens = _hw(r["map"]) if "map" in r else ""
            lines.append(
                f"{r['part']:12s} {tokens:>9s} {'':>9s} {'':>6s} {'':>10s} {r['channels']:>10s} {'':>5s}  "
                f"{r['note'][:14]:14s} {r['params']:>12,d} {r['macs'] / 1e9:7.3f}"
            )
    lines.append("")
    lines.append(
        "blocks: W = regular windows, SW = shifted windows (shift window//2); a stage's params include "
        "its patch merging"
    )
    lines.append("into the next stage; head = final norm + classifier. GMACs per stage include the merging.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Drawing helpers


def _figure(width: float, height: float, dpi: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def _save(fig, out: str | os.PathLike) -> Path:
    """Render with Agg at the figure's size and dpi and write a PNG atomically (256 colours when big)."""
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from swinx.weights.checkpoint import atomic_write

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    buffer = io.BytesIO()
    image.save(buffer, format="png", optimize=True)
    if buffer.tell() > _MAX_PNG_BYTES:  # photographs: 256 colours keep the file small, lines and text crisp
        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, format="png", optimize=True)
    out = Path(out)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return out


def _outlined(width: float = 2.6):
    from matplotlib import patheffects

    return [patheffects.Stroke(linewidth=width, foreground="black"), patheffects.Normal()]


def _text_outline():
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=2, foreground="white")]


def _window_lines(geometry: WindowGeometry, padded: tuple[int, int], token: int) -> list:
    """Segments (pixel coordinates) of a block's window borders on the unrolled padded map."""
    (wh, ww), (sh, sw) = geometry.window, geometry.shift
    Hp, Wp = padded
    X, Y = Wp * token, Hp * token
    rows = sorted({0, Hp} | {(sh + k * wh) % Hp for k in range(Hp // wh)})
    cols = sorted({0, Wp} | {(sw + k * ww) % Wp for k in range(Wp // ww)})
    return [[(0, r * token), (X, r * token)] for r in rows] + [[(c * token, 0), (c * token, Y)] for c in cols]


def _draw_window_grid(ax, geometry, padded, token, color="white", lw=1.4):
    from matplotlib.collections import LineCollection

    lines = LineCollection(_window_lines(geometry, padded, token), colors=color, linewidths=lw, zorder=4)
    lines.set_path_effects(_outlined(lw + 1.4))
    ax.add_collection(lines)


def _token_lines(rows: range, cols: range, token: int, extent: tuple[int, int, int, int]) -> list:
    r0, r1, c0, c1 = extent
    return [[(c0 * token, r * token), (c1 * token, r * token)] for r in rows] + [
        [(c * token, r0 * token), (c * token, r1 * token)] for c in cols
    ]


def _region_rgba(labels, alpha: float, alpha0: float | None = None):
    """RGBA image of region labels; region 0 (the bulk of the map) may get its own, lighter alpha."""
    import numpy as np
    from matplotlib.colors import to_rgba

    colors = np.array([to_rgba(c, alpha if i or alpha0 is None else alpha0) for i, c in enumerate(REGION_COLORS)])
    return colors[np.asarray(labels)]


def _label_regions(ax, labels, token: int, fontsize: float = 7.5, offset=(0, 0)):
    """Write each region's number at the centre of its rectangle (regions are rectangles here)."""
    import numpy as np

    labels = np.asarray(labels)
    for value in np.unique(labels):
        rows, cols = np.nonzero(labels == value)
        y = (rows.min() + rows.max() + 1) / 2 * token + offset[0]
        x = (cols.min() + cols.max() + 1) / 2 * token + offset[1]
        ax.text(
            x,
            y,
            str(int(value)),
            ha="center",
            va="center",
            fontsize=fontsize,
            fontweight="bold",
            color="black",
            path_effects=_text_outline(),
            zorder=6,
            clip_on=False,
        )


def _hatch(ax, x0, y0, x1, y1, **kw):
    from matplotlib.patches import Rectangle

    if x1 > x0 and y1 > y0:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, **kw))


def _pad_style():
    return dict(facecolor="#d9d9d9", edgecolor="#6e6e6e", hatch="////", linewidth=0, zorder=2)


def _edge_pad_style():
    return dict(facecolor="#efefef", edgecolor="none", linewidth=0, zorder=2)


def _image_array(image):
    import numpy as np

    return np.asarray(image)


def _show_image(ax, image, extent, alpha: float = 1.0):
    arr = _image_array(image)
    kw = dict(cmap="gray", vmin=0, vmax=255) if arr.ndim == 2 else {}
    ax.imshow(
        arr,
        extent=extent,
        interpolation="nearest" if min(arr.shape[:2]) < 100 else "antialiased",
        zorder=1,
        alpha=alpha,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# 1. windows


def draw_windows(
    image,
    out: str | os.PathLike,
    model="swin_t",
    size: tuple[int, int] | None = None,
    small_map: str | None = None,
    dpi: int = 120,
    stages: list[int] | None = None,
) -> Path:
    """The image with each stage's token grid and window grid, regular and shifted side by side.

    One row per stage (`stages`: only these, numbered from 1). Padding (the map padded to a
    multiple of the window at the bottom and right) is hatched; in the shifted column the nine
    regions are coloured and numbered.
    `image` is a path, a PIL image or an array; `size` (H, W) resizes it first.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Patch

    config = _config(model)
    if small_map is not None:
        config = config.replace(small_map=small_map)
    img = _as_image(image, 3, size)
    W, H = img.size
    layouts = stage_layouts(config, (H, W))
    if stages is not None:
        for stage in stages:
            _check_stage(config, stage)
        layouts = [layout for layout in layouts if layout.stage in stages]
    panel_w = 3.5
    heights = [panel_w * l.padded[0] / l.padded[1] for l in layouts]
    fig = _figure(2 * panel_w + 0.3, sum(heights) + 0.75 * len(layouts) + 1.0, dpi)
    axes = fig.subplots(len(layouts), 2, squeeze=False, gridspec_kw={"height_ratios": heights})
    sparse_grid = False
    for layout, row in zip(layouts, axes):
        Hp, Wp = layout.padded
        t = layout.token
        X, Y = Wp * t, Hp * t
        px_per_pixel = panel_w * dpi * 0.9 / X  # display pixels per image pixel (about)
        for col, ax in enumerate(row):
            g = layout.geometry(col)
            ax.set_facecolor("white")
            _show_image(ax, img, (0, W, H, 0), alpha=0.75)  # faded: the grids are the subject
            # padding: the pixels the patch embedding / merging add, then the window padding
            _hatch(ax, W, 0, layout.width * t, layout.height * t, **_edge_pad_style())
            _hatch(ax, 0, H, W, layout.height * t, **_edge_pad_style())
            _hatch(ax, layout.width * t, 0, Wp * t, Hp * t, **_pad_style())
            _hatch(ax, 0, layout.height * t, layout.width * t, Hp * t, **_pad_style())
            # token grid: everywhere when legible, else inside one window only
            sh, sw = g.shift
            if t * px_per_pixel >= 5:
                lines = _token_lines(range(Hp + 1), range(Wp + 1), t, (0, Hp, 0, Wp))
                width, alpha = 0.35, 0.55
            else:
                sparse_grid = True
                r0, c0 = sh, sw
                r1, c1 = min(r0 + g.window[0], Hp), min(c0 + g.window[1], Wp)
                lines = _token_lines(range(r0, r1 + 1), range(c0, c1 + 1), t, (r0, r1, c0, c1))
                width, alpha = 0.4, 0.9
            ax.add_collection(LineCollection(lines, colors="white", linewidths=width, alpha=alpha, zorder=3))
            nwin = (Hp // g.window[0]) * (Wp // g.window[1])
            kind = "regular windows (even blocks)" if col == 0 else "shifted windows (odd blocks)"
            detail = (
                f"map {layout.height}x{layout.width} tokens of {t}x{t} px, padded {Hp}x{Wp}\n"
                f"window {_square(g.window)}, shift {_square(g.shift)}: "
                f"{Hp // g.window[0]}x{Wp // g.window[1]} = {nwin} windows"
            )
            if col == 1 and not g.has_shift:
                detail = (
                    f"map {layout.height}x{layout.width} tokens of {t}x{t} px, padded {Hp}x{Wp}\n"
                    + _no_shift_reason(layout, config.small_map).replace("\n", " ")
                )
            elif col == 1:
                labels = torch.roll(region_labels(Hp, Wp, g.window, g.shift), shifts=g.shift, dims=(0, 1))
                ax.imshow(
                    _region_rgba(labels, 0.4, 0.08), extent=(0, Wp * t, Hp * t, 0), interpolation="nearest", zorder=2.5
                )
                _label_regions(ax, labels, t, fontsize=7)
            _draw_window_grid(ax, g, (Hp, Wp), t, lw=1.1 if g.window[1] * t * px_per_pixel > 60 else 0.7)
            ax.set_xlim(0, X)
            ax.set_ylim(Y, 0)
            ax.set_aspect("equal")
            ax.set_title(f"stage {layout.stage}: {kind}\n{detail}", fontsize=7.5, linespacing=1.3)
            ax.tick_params(labelsize=6.5, length=2)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
    handles = [Patch(facecolor=c, alpha=0.6 if i else 0.2, label=str(i)) for i, c in enumerate(REGION_COLORS)]
    handles += [
        Patch(**{k: v for k, v in _pad_style().items() if k != "zorder"}, label="padding to the window"),
        Patch(facecolor="#efefef", label="padding to an even map (patch embed, merging)"),
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=6,
        fontsize=7,
        handlelength=1.2,
        columnspacing=0.8,
        title="shifted regions: row region x 3 + column region\nthick lines: windows; "
        "thin lines: tokens" + (" (where too dense, in one window only)" if sparse_grid else ""),
        title_fontsize=7.5,
        frameon=False,
    )
    fig.suptitle(
        f"{config.window_size}x{config.window_size} windows of each stage on a {H}x{W} image "
        f"(patch {config.patch_size}, small maps: {config.small_map}; axes in pixels)",
        fontsize=10,
    )
    return _save(fig, out)


def _square(pair) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _no_shift_reason(layout: StageLayout, small_map: str) -> str:
    g = layout.shifted
    if small_map == "clamp" and g.window[0] < layout.window_size:
        return (
            f"fits one window on its short side:\nwindow clamped to {g.window[0]}, no shift, "
            f"{layout.window_counts(1)[0] * layout.window_counts(1)[1]} window(s)"
        )
    if small_map == "clamp":
        return f"fits one {layout.window_size}x{layout.window_size} window:\nno shift (clamp rule)"
    if small_map == "pad_shift":  # the shift is kept at every size: only a 1-token window has none
        return f"window {layout.window_size} has no shift (pad_shift rule)"
    return "each padded axis fits one window:\nno shift (pad rule)"


# ---------------------------------------------------------------------------------------------
# 2. mask


def draw_mask(
    out: str | os.PathLike,
    model="swin_t",
    size: tuple[int, int] | None = None,
    stage: int = 1,
    small_map: str | None = None,
    dpi: int = 130,
) -> Path:
    """The shifted-window attention mask of a stage: the rolled map's regions, and the N x N mask
    of each distinct kind of window (white: may attend, black: masked)."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Patch, Rectangle

    config = _config(model)
    if small_map is not None:
        config = config.replace(small_map=small_map)
    _check_stage(config, stage)
    H, W = _size(size, config.img_hw)
    layout = stage_layouts(config, (H, W))[stage - 1]
    g = layout.shifted
    if not g.has_shift:
        raise ValueError(
            f"stage {stage} at {H}x{W} has no shifted windows, so nothing is masked: its "
            f"{layout.height}x{layout.width} map "
            + _no_shift_reason(layout, config.small_map).replace("\n", " ")
            + "; pick another stage or a larger --size"
        )
    Hp, Wp = layout.padded
    labels = region_labels(Hp, Wp, g.window, g.shift)
    kinds = window_kinds(Hp, Wp, g.window, g.shift)
    (wh, ww), (sh, sw) = g.window, g.shift
    N = wh * ww

    fig = _figure(12.0, 6.2, dpi)
    sub = fig.subfigures(1, 2, width_ratios=[1.1, 1.0], wspace=0.02)
    ax = sub[0].subplots()
    ax.imshow(_region_rgba(labels, 0.55), extent=(0, Wp, Hp, 0), interpolation="nearest")
    # padding, in the rolled coordinates: original rows [h, Hp) sit at [h - sh, Hp - sh)
    pad = _pad_style()
    pad.update(facecolor="none", edgecolor="#444444", zorder=3)
    _hatch(ax, 0, layout.height - sh, Wp, Hp - sh, **pad)
    _hatch(ax, layout.width - sw, 0, Wp - sw, Hp, **pad)
    grid = [[(0, r), (Wp, r)] for r in range(0, Hp + 1, wh)] + [[(c, 0), (c, Hp)] for c in range(0, Wp + 1, ww)]
    ax.add_collection(LineCollection(grid, colors="black", linewidths=1.0, zorder=4))
    _label_regions(ax, labels, 1, fontsize=8)
    letters = "ABCD"
    for letter, kind in zip(letters, kinds):
        r, c = kind.index
        ax.add_patch(
            Rectangle(
                (c * ww, r * wh),
                ww,
                wh,
                facecolor="none",
                edgecolor="white",
                linewidth=2.2,
                zorder=5,
                path_effects=_outlined(4.2),
            )
        )
        ax.text(
            c * ww + ww / 2,
            r * wh - 0.4,
            letter,
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold",
            zorder=6,
            path_effects=_text_outline(),
            clip_on=False,
        )
    ax.set_xlim(0, Wp)
    ax.set_ylim(Hp, 0)
    ax.set_xlabel("token column (rolled map)", fontsize=8)
    ax.set_ylabel("token row (rolled map)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(
        f"stage {stage}: {layout.height}x{layout.width} tokens, padded to {Hp}x{Wp}, rolled by "
        f"-{_square(g.shift)}\n{Hp // wh}x{Wp // ww} windows of {_square(g.window)}; region = row region "
        "x 3 + column region",
        fontsize=8.5,
    )
    ax.legend(
        handles=[Patch(facecolor="none", edgecolor="#444444", hatch="////", label="padding")],
        loc="upper right",
        fontsize=7,
        framealpha=0.9,
        bbox_to_anchor=(1.0, -0.06),
        borderaxespad=0,
    )

    axes = sub[1].subplots(2, 2).ravel()
    for ax in axes[len(kinds) :]:
        ax.set_visible(False)
    for letter, kind, ax in zip(letters, kinds, axes):
        ax.imshow(
            kind.allowed.numpy(),
            cmap="gray",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(-0.5, N - 0.5, N - 0.5, -0.5),
        )
        lab = kind.labels.tolist()
        bounds = [i for i in range(1, N) if lab[i] != lab[i - 1]]
        runs = list(zip([0] + bounds, bounds + [N]))
        ticks = [b - 0.5 for b in bounds]
        centres = [(a + b - 1) / 2 for a, b in runs]
        names = [str(lab[a]) for a, _ in runs]
        small = 6 if len(runs) <= 16 else 4.5
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_ticks(ticks)
            axis.set_ticklabels([])
            axis.set_ticks(centres, minor=True)
            axis.set_ticklabels(names, minor=True, fontsize=small)
        ax.tick_params(which="major", length=5, width=0.6, color="#d62728")
        ax.tick_params(which="minor", length=0, pad=2)
        for b in ticks:
            ax.axhline(b, color="#d62728", lw=0.35, alpha=0.6)
            ax.axvline(b, color="#d62728", lw=0.35, alpha=0.6)
        blocked = int((~kind.allowed).sum())
        regions = sorted(set(lab))
        detail = (
            f"regions {', '.join(map(str, regions))}: {blocked:,} of {N * N:,} pairs masked"
            if blocked
            else f"region {regions[0]} only: all {N * N:,} pairs allowed"
        )
        ax.set_title(f"{letter}: {kind.name} window {kind.index}\n{detail}", fontsize=8)
        ax.set_xlabel("key token (its region)", fontsize=7)
        ax.set_ylabel("query token (its region)", fontsize=7)
    sub[1].suptitle(
        f"{N}x{N} masks, tokens in row-major window order: white = may attend, black = masked (-100)", fontsize=8.5
    )
    fig.suptitle(
        f"Shifted-window attention mask, {config.window_size}x{config.window_size} windows, "
        f"{H}x{W} image (patch {config.patch_size})",
        fontsize=10,
    )
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------
# 3. attention


def _as_loaded(model):
    from swinx.classification.inference import Loaded, load_for_inference
    from swinx.model.swin import SwinTransformer

    if isinstance(model, Loaded):
        return model
    if isinstance(model, SwinTransformer):
        from swinx.classification import data as D

        c = model.config
        rgb = c.in_chans == 3
        spec = {
            "img_size": c.img_hw[0],
            "channels": c.in_chans,
            "mean": list(D.IMAGENET_MEAN if rgb else D.MNIST_MEAN * c.in_chans),
            "std": list(D.IMAGENET_STD if rgb else D.MNIST_STD * c.in_chans),
        }
        names = getattr(model, "class_names", None) or [f"class {i}" for i in range(model.num_classes)]
        return Loaded(model.eval(), list(names), spec, None, Path("<model>"))
    return load_for_inference(model)


def _to_input(image, loaded) -> torch.Tensor:
    import numpy as np

    arr = torch.as_tensor(np.array(image, dtype=np.float32) / 255.0)
    arr = arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)
    mean = torch.tensor(loaded.input["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(loaded.input["std"], dtype=torch.float32)[:, None, None]
    device = next(loaded.model.parameters()).device
    return ((arr - mean) / std)[None].to(device)


def _upsample(maps: torch.Tensor, token: int, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(heads, h, w) token maps -> (heads, H, W) pixel maps covering the image."""
    h, w = maps.shape[-2:]
    if interpolation == "nearest":
        up = maps.repeat_interleave(token, -2).repeat_interleave(token, -1)
    elif interpolation == "bilinear":
        up = F.interpolate(maps[None], size=(h * token, w * token), mode="bilinear", align_corners=False)[0]
    else:
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    return up[:, : size[0], : size[1]]


def draw_attention(
    model,
    image,
    out: str | os.PathLike,
    stage: int = 1,
    block: int = 0,
    head: int | None = 0,
    query: tuple[int, int] | None = None,
    size: tuple[int, int] | None = None,
    interpolation: str = "nearest",
    dpi: int = 130,
) -> Path:
    """Attention of one block, stitched back across windows onto the image.

    `model` is a checkpoint path (any layout `load_for_inference` reads), a `Loaded` or a
    model. With `query` (row, col of the stage's token map) each panel shows that query's
    attention; without, the mean attention each token receives from its window's queries.
    `head=None` draws every head of the block in a grid.
    """
    import numpy as np
    from matplotlib.patches import Rectangle

    loaded = _as_loaded(model)
    config = loaded.model.config
    _check_block(config, stage, block)
    heads = list(range(config.num_heads[stage - 1])) if head is None else [_check_head(config, stage, head)]
    img = _as_image(image, loaded.input["channels"], size)
    W, H = img.size
    x = _to_input(img, loaded)
    att = block_attention(loaded.model, x, stage, block)
    if query is not None:
        row, col = query
        att.check_query(row, col)
        tokens = att.query_map(row, col)
        on_padding = 1 - tokens.sum((-2, -1))
        pieces = len(att.window_rects(row, col))
        what = f"attention of query ({row}, {col}); dashed: its window" + (
            f", in {pieces} pieces across the cyclic shift" if pieces > 1 else ""
        )
    else:
        tokens = att.received_map()
        on_padding = None
        what = "mean attention received from the queries of each window"
    pixels = _upsample(tokens, att.token, (H, W), interpolation).numpy()

    n = len(heads) + 1
    nrows = math.ceil(n / 5)
    ncols = math.ceil(n / nrows)
    panel = 3.0 if max(H, W) > 64 else 2.6
    aspect = H / W
    fig = _figure(ncols * (panel + 0.55) + 0.2, nrows * (panel * aspect + 0.75) + 0.7, dpi)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    g = att.geometry
    padded = att.padded

    def decorate(ax):
        if query is not None:
            for r0, r1, c0, c1 in att.window_rects(row, col):
                ax.add_patch(
                    Rectangle(
                        (c0 * att.token, r0 * att.token),
                        (c1 - c0) * att.token,
                        (r1 - r0) * att.token,
                        facecolor="none",
                        edgecolor="#00e5ff",
                        linewidth=1.5,
                        linestyle="--",
                        zorder=5,
                    )
                )
            ax.plot(
                [(col + 0.5) * att.token],
                [(row + 0.5) * att.token],
                marker="o",
                markersize=7,
                markerfacecolor="#00e5ff",
                markeredgecolor="black",
                markeredgewidth=1.0,
                zorder=6,
            )
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])

    ax = axes[0]
    _show_image(ax, img, (0, W, H, 0))
    _draw_window_grid(ax, g, padded, att.token, lw=1.0)
    decorate(ax)
    kind = "shifted" if g.has_shift else "regular"
    ax.set_title(
        f"input {H}x{W}, {att.height}x{att.width} tokens\n{kind} windows {_square(g.window)}, shift {_square(g.shift)}",
        fontsize=8,
    )
    gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    for h, ax in zip(heads, axes[1:]):
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=(0, W, H, 0), interpolation="nearest", zorder=1)
        shown = ax.imshow(
            pixels[h], cmap=_ATTENTION_CMAP, alpha=0.72, vmin=0, extent=(0, W, H, 0), interpolation="nearest", zorder=2
        )
        _draw_window_grid(ax, g, padded, att.token, color="#bbbbbb", lw=0.6)
        decorate(ax)
        title = f"head {h}"
        if on_padding is not None and float(on_padding[h]) > 0.005:
            title += f" ({100 * float(on_padding[h]):.0f}% on padding)"
        ax.set_title(title, fontsize=8.5)
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=6.5)
        bar.solids.set_alpha(1)
    title = f"stage {stage}, block {block}: {what}"
    if loaded.model.num_classes > 0:
        probs = att.logits.softmax(-1)
        top = int(probs.argmax())
        names = loaded.class_names
        label = names[top] if top < len(names) else str(top)
        title += f"\n(prediction: {label}, {100 * float(probs[top]):.0f}%)"
    fig.suptitle(title, fontsize=9.5)
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------
# 4. bias


def draw_bias(model, out: str | os.PathLike, stage: int = 1, block: int = 0, dpi: int = 130) -> Path:
    """Each head's relative position bias of one block as a (2M-1) x (2M-1) image, one colour scale."""
    import numpy as np

    loaded = _as_loaded(model)
    attn = _block(loaded.model, stage, block).attn
    images = bias_images(attn).numpy()
    heads, side = images.shape[0], images.shape[1]
    M = (side + 1) // 2
    ncols = min(heads, 4)
    nrows = math.ceil(heads / ncols)
    panel = 2.5
    fig = _figure(ncols * panel + 0.9, nrows * (panel + 0.35) + 0.75, dpi)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False))
    if attn.version == 1:
        vmax = float(np.abs(images).max()) or 1.0
        cmap, vmin, what = "RdBu_r", -vmax, "learned table B (V1)"
    else:
        cmap, vmin, vmax = "viridis", float(images.min()), float(images.max())
        what = "16 sigmoid(cpb_mlp(log-spaced offsets)) (V2)"
    ticks = sorted({0, M - 1, -(M - 1), (M - 1) // 2, -((M - 1) // 2)})
    for ax in axes.ravel()[heads:]:
        ax.set_visible(False)
    for h, ax in enumerate(axes.ravel()[:heads]):
        shown = ax.imshow(
            images[h],
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
            extent=(-M + 0.5, M - 0.5, M - 0.5, -M + 0.5),
        )
        ax.plot(
            [0], [0], marker="s", markersize=7, markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.2
        )
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)
        ax.set_title(f"head {h}  (centre {images[h, M - 1, M - 1]:+.2f})", fontsize=8.5)
        if h % ncols == 0:
            ax.set_ylabel("dy (query row - key row)", fontsize=7.5)
        if h // ncols == nrows - 1 or h + ncols >= heads:
            ax.set_xlabel("dx (query col - key col)", fontsize=7.5)
    bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.035, pad=0.02, shrink=0.85 if nrows == 1 else 1.0)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("bias added to the attention logit", fontsize=7.5)
    fig.suptitle(
        f"Relative position bias, stage {stage} block {block}: {what}, window {M}\n"
        f"offsets -{M - 1}..{M - 1}; the square marks offset (0, 0)",
        fontsize=9,
    )
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------
# 5. model


def draw_model(
    model, out: str | os.PathLike, size: int | tuple[int, int] | None = None, name: str | None = None, dpi: int = 130
) -> Path:
    """A one-page architecture diagram: patch embedding, the stages (tokens, channels, blocks with
    their shift pattern, heads, windows, parameters, GMACs), merging between them, the head."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    if name is None and isinstance(model, str):
        name = model
    config = _config(model)
    (H, W), rows = _summary_rows(config, size)
    stages = [r for r in rows if r["part"].startswith("stage")]
    total = rows[-1]
    n = len(stages)
    width = 2.0 + 2.05 * n + 1.9
    fig = _figure(width, 5.6, dpi)
    fig.set_layout_engine(None)
    ax_diagram = fig.add_axes((0.01, 0.36, 0.98, 0.52))
    ax_diagram.set_xlim(0, width)
    ax_diagram.set_ylim(0, 3.2)
    ax_diagram.axis("off")

    def box(x, w, color, title, top, bottom):
        ax_diagram.add_patch(
            FancyBboxPatch(
                (x, 0.12),
                w,
                2.9,
                boxstyle="round,pad=0.02,rounding_size=0.12",
                facecolor=color,
                edgecolor="#333333",
                linewidth=1.0,
            )
        )
        ax_diagram.text(x + w / 2, 2.85, title, ha="center", va="top", fontsize=9.5, fontweight="bold")
        ax_diagram.text(x + w / 2, 2.5, "\n".join(top), ha="center", va="top", fontsize=7.6, linespacing=1.45)
        ax_diagram.text(x + w / 2, 0.3, "\n".join(bottom), ha="center", va="bottom", fontsize=7.6, linespacing=1.45)

    def arrow(x0, x1, label=""):
        ax_diagram.add_patch(
            FancyArrowPatch((x0, 1.55), (x1, 1.55), arrowstyle="-|>", mutation_scale=12, linewidth=1.2, color="#333333")
        )
        if label:
            ax_diagram.text((x0 + x1) / 2, 1.7, label, ha="center", va="bottom", fontsize=6.5, color="#333333")

    def cost(r):
        return [f"{r['params']:,} params", f"{r['macs'] / 1e9:.3f} GMACs"]

    pe = rows[0]
    x = 0.1
    p = config.patch_size
    box(
        x,
        1.55,
        "#e8eef7",
        "patch embed",
        [
            f"image {H}x{W}x{config.in_chans}",
            f"{p}x{p} conv, stride {p}",
            f"-> {_hw(pe['map'])} tokens",
            f"{config.embed_dim} ch",
        ],
        cost(pe),
    )
    x += 1.55
    stage_w, gap = 1.65, 0.4
    for r in stages:
        dim = int(r["channels"])
        arrow(x + 0.02, x + gap - 0.02, "" if r["part"] == "stage1" else "merge\n2x2")
        x += gap
        nwin = r["windows"][0] * r["windows"][1]
        shift = _square(r["shift"]) if any(b == "SW" for b in r["blocks"]) else "off"
        top = [
            f"{_hw(r['map'])} tokens, {dim} ch",
            f"{len(r['blocks'])} blocks, {r['heads']} heads",
            f"window {_square(r['window'])}, {nwin} window{'s' if nwin > 1 else ''}",
            f"padded {_hw(r['padded'])}, shift {shift}",
        ]
        box(x, stage_w, "#fdf1e3", f"stage {r['part'][5:]}", top, cost(r))
        # the per-block shift pattern as small tiles
        blocks = r["blocks"]
        tile, space = min(0.3, (stage_w - 0.2) / len(blocks) - 0.04), 0.04
        x0 = x + stage_w / 2 - (len(blocks) * (tile + space) - space) / 2
        for j, b in enumerate(blocks):
            ax_diagram.add_patch(
                FancyBboxPatch(
                    (x0 + j * (tile + space), 1.05),
                    tile,
                    0.26,
                    boxstyle="round,pad=0,rounding_size=0.04",
                    facecolor="#f28e2b" if b == "SW" else "#bab0ac",
                    edgecolor="#333333",
                    linewidth=0.6,
                )
            )
            ax_diagram.text(
                x0 + j * (tile + space) + tile / 2,
                1.18,
                b,
                ha="center",
                va="center",
                fontsize=6 if tile > 0.2 else 4.5,
                color="black",
            )
        x += stage_w
    head = rows[-2]
    arrow(x + 0.02, x + gap - 0.02)
    x += gap
    box(
        x,
        1.55,
        "#e8f4ea",
        "head",
        ["final norm", "average pool", f"linear {head['channels'].replace('->', ' -> ')}"],
        cost(head),
    )

    parts = rows[:-1]
    labels = [r["part"].replace("patch_embed", "patch\nembed") for r in parts]
    ax_params = fig.add_axes((0.07, 0.07, 0.40, 0.22))
    ax_macs = fig.add_axes((0.57, 0.07, 0.40, 0.22))
    for ax, key, scale, unit, color in (
        (ax_params, "params", 1e6, "parameters (M)", "#4e79a7"),
        (ax_macs, "macs", 1e9, "GMACs", "#e15759"),
    ):
        values = [r[key] / scale for r in parts]
        bars = ax.bar(range(len(parts)), values, color=color, width=0.65)
        ax.set_xticks(range(len(parts)), labels, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel(unit, fontsize=7.5)
        ax.set_ylim(0, max(values) * 1.25)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=6.5)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.text(
        0.5,
        0.965,
        f"{name or 'model'}: Swin Transformer V{config.version} at {H}x{W}: "
        f"{total['params']:,} parameters, {total['macs'] / 1e9:.2f} GMACs",
        ha="center",
        va="top",
        fontsize=11,
        fontweight="bold",
    )
    fig.text(
        0.5,
        0.915,
        "W: regular windows, SW: shifted windows; stage parameters and GMACs include the patch "
        "merging into the next stage; GMACs in the official convention (multiply-accumulates)",
        ha="center",
        va="top",
        fontsize=7.5,
        color="#444444",
    )
    return _save(fig, out)
