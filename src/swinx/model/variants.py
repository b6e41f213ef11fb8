"""Named variants: a table of configs, the official and timm names as aliases, create_model."""

from __future__ import annotations

from swinx.model.config import SwinConfig
from swinx.model.swin import SwinTransformer

_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_V2 = dict(version=2, img_size=256, window_size=8)

VARIANTS: dict[str, SwinConfig] = {
    "swin_t": SwinConfig(),
    "swin_s": SwinConfig(**_SMALL),
    "swin_b": SwinConfig(**_BASE),
    "swin_l": SwinConfig(**_LARGE),
    "swinv2_t": SwinConfig(**_V2),
    "swinv2_s": SwinConfig(**_V2, **_SMALL),
    "swinv2_b": SwinConfig(**_V2, **_BASE),
    "swinv2_l": SwinConfig(**_LARGE, version=2, img_size=384, window_size=24, pretrained_window_sizes=(12, 12, 12, 6)),
}

_IN22K = 21841  # ImageNet-22k head of the official 22k checkpoints


def _aliases() -> dict[str, tuple[str, dict]]:
    """Official (microsoft/Swin-Transformer) and timm names -> (variant, overrides)."""
    aliases: dict[str, tuple[str, dict]] = {}
    for size, base in (("tiny", "swin_t"), ("small", "swin_s"), ("base", "swin_b"), ("large", "swin_l")):
        aliases[f"swin_{size}_patch4_window7_224"] = (base, {})
        aliases[f"swin_{size}_patch4_window7_224_22k"] = (base, {"num_classes": _IN22K})
        if size in ("base", "large"):
            aliases[f"swin_{size}_patch4_window12_384"] = (base, {"img_size": 384, "window_size": 12})
            aliases[f"swin_{size}_patch4_window12_384_22k"] = (
                base,
                {"img_size": 384, "window_size": 12, "num_classes": _IN22K},
            )
    for size, base in (("tiny", "swinv2_t"), ("small", "swinv2_s"), ("base", "swinv2_b")):
        for window in (8, 16):
            over = {"window_size": window}
            aliases[f"swinv2_{size}_window{window}_256"] = (base, over)
            aliases[f"swinv2_{size}_patch4_window{window}_256"] = (base, over)
    for size, base in (("base", "swinv2_b"), ("large", "swinv2_l")):
        pre = {"img_size": 192, "window_size": 12, "pretrained_window_sizes": (0, 0, 0, 0)}
        aliases[f"swinv2_{size}_window12_192"] = (base, {**pre, "num_classes": _IN22K})
        aliases[f"swinv2_{size}_patch4_window12_192_22k"] = (base, {**pre, "num_classes": _IN22K})
        for window, img in ((16, 256), (24, 384)):
            over = {"img_size": img, "window_size": window, "pretrained_window_sizes": (12, 12, 12, 6)}
            aliases[f"swinv2_{size}_window12to{window}_192to{img}"] = (base, over)
            aliases[f"swinv2_{size}_patch4_window12to{window}_192to{img}_22kto1k_ft"] = (base, over)
    return aliases


ALIASES = _aliases()


def list_models(pattern: str = "", aliases: bool = True) -> list[str]:
    """Names `create_model` accepts, optionally filtered by a substring."""
    names = list(VARIANTS) + (sorted(ALIASES) if aliases else [])
    return [n for n in names if pattern in n]


def get_config(name: str = "swin_t", **overrides) -> SwinConfig:
    """The config of a named variant with keyword overrides applied."""
    if name in VARIANTS:
        base, extra = name, {}
    elif name in ALIASES:
        base, extra = ALIASES[name]
    else:
        close = [n for n in list_models() if name.split("_")[0] in n][:8]
        raise ValueError(
            f"unknown model {name!r}; known: {', '.join(VARIANTS)} "
            f"(and {len(ALIASES)} official/timm aliases, see swinx.list_models()). Close: {close}"
        )
    return VARIANTS[base].replace(**{**extra, **overrides})


def create_model(name: str | None = "swin_t", pretrained=None, **overrides) -> SwinTransformer:
    """Build a named variant; any SwinConfig field can be overridden, e.g. create_model("swin_t", num_classes=10).

    `pretrained`: weights to load, from a checkpoint file of any layout, a model directory
    (transformers' or timm's config.json + weights) or a hub id (microsoft/swin-tiny-patch4-window7-224,
    timm/swin_tiny_patch4_window7_224.ms_in1k, hf-hub:...; offline from the local cache). The
    architecture then comes from the source, unless `name` is a variant; `create_model(SOURCE,
    pretrained=True)` and `create_model(None, pretrained=SOURCE)` are the same. Overrides apply on
    top: num_classes=10 keeps the trunk and gives a new head. The model gets `class_names`, and
    `pretrained_cfg` (img_size, channels, mean, std, crop_pct, interpolation, source) from the source.
    """
    if pretrained is None or pretrained is False:
        if name is None:
            raise ValueError("create_model(None) needs pretrained=<file, model directory or hub id>")
        return SwinTransformer(get_config(name, **overrides))
    from swinx.weights.sources import load_pretrained

    if pretrained is True:
        if name is None or name in VARIANTS or name in ALIASES:
            raise ValueError(
                f"pretrained=True needs a source as the name (a hub id, model directory or file); swinx bundles "
                f"no weights, so give create_model({name!r}, pretrained=<hub id, directory or file>)"
            )
        name, pretrained = None, name
    base = get_config(name) if name is not None else None
    return load_pretrained(pretrained, base, **overrides)
