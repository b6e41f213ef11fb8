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

# pretrained=True for a name: timm's hub repository of its weights (timm's default tag comes first).
_IN1K_FIRST = {"swin_tiny_patch4_window7_224"} | {n for n in ALIASES if n.startswith("swinv2_") and "192" not in n}
TIMM_NAMES = {  # our short names -> timm's name of the same architecture
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
    "swin_l": "swin_large_patch4_window7_224",
    "swinv2_t": "swinv2_tiny_window8_256",
    "swinv2_s": "swinv2_small_window8_256",
    "swinv2_b": "swinv2_base_window8_256",
    "swinv2_l": "swinv2_large_window12to24_192to384",
}


def hub_id(name: str) -> str:
    """The hub repository timm keeps `name`'s default weights in, e.g. timm/swin_tiny_patch4_window7_224.ms_in1k."""
    name = TIMM_NAMES.get(name, name)
    if name.startswith("swinv2_"):
        name = name.replace("_patch4_", "_")  # timm's V2 names have no patch size
    if name.endswith("_22k"):  # the official 22k names: timm's ms_in22k weights
        return f"timm/{name.removesuffix('_22k')}.ms_in22k"
    if name.endswith("_22kto1k_ft") or "192to" in name:
        return f"timm/{name.removesuffix('_22kto1k_ft')}.ms_in22k_ft_in1k"
    if name.endswith("_192"):
        return f"timm/{name}.ms_in22k"
    if name.startswith("swinv2_"):
        return f"timm/{name}.ms_in1k"
    return f"timm/{name}.{'ms_in1k' if name in _IN1K_FIRST else 'ms_in22k_ft_in1k'}"


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
        if name is None:
            raise ValueError("create_model(None, pretrained=True): give a variant, a hub id or a file as the name")
        if name in VARIANTS or name in ALIASES:  # as timm: the name's default weights from timm's hub repository
            pretrained = hub_id(name)
        else:
            name, pretrained = None, name
    base = get_config(name) if name is not None else None
    return load_pretrained(pretrained, base, **overrides)
