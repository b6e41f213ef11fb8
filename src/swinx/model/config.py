"""SwinConfig: every setting of a Swin Transformer, with the official field names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from swinx.model.windows import SMALL_MAP_POLICIES


@dataclass(frozen=True)
class SwinConfig:
    """Constructor arguments of the official SwinTransformer / SwinTransformerV2, plus two of ours.

    `version` picks V1 or V2. `small_map` says what a block does when the map fits in one
    window: "clamp" (official, timm, Hugging Face), "pad" (torchvision) or "pad_shift"
    (OpenMMLab with `pad_small_map=True`, mmdetection always). `img_size` is the
    training resolution (absolute position embedding, exported buffers); the model runs on
    any size.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False
    patch_norm: bool = True
    pretrained_window_sizes: tuple[int, ...] = field(default=(0, 0, 0, 0))
    version: int = 1
    small_map: str = "clamp"

    def __post_init__(self):
        as_tuple = lambda v: tuple(int(i) for i in v)  # noqa: E731
        object.__setattr__(self, "depths", as_tuple(self.depths))
        object.__setattr__(self, "num_heads", as_tuple(self.num_heads))
        if not isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", as_tuple(self.img_size))
        pws = self.pretrained_window_sizes
        pws = (pws,) * len(self.depths) if isinstance(pws, int) else as_tuple(pws)
        if len(pws) != len(self.depths) and not any(pws):
            pws = (0,) * len(self.depths)
        object.__setattr__(self, "pretrained_window_sizes", pws)
        problems = []
        if len(self.depths) != len(self.num_heads):
            problems.append(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if len(pws) != len(self.depths):
            problems.append(f"pretrained_window_sizes {pws} needs one entry per stage ({len(self.depths)})")
        if self.version not in (1, 2):
            problems.append(f"version must be 1 or 2, got {self.version!r}")
        if self.small_map not in SMALL_MAP_POLICIES:
            problems.append(f"small_map must be one of {SMALL_MAP_POLICIES}, got {self.small_map!r}")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                problems.append(f"stage {i}: {self.embed_dim * 2**i} channels are not divisible by {heads} heads")
        if min(self.patch_size, self.window_size, self.in_chans, self.embed_dim) < 1 or self.num_classes < 0:
            problems.append("patch_size, window_size, in_chans and embed_dim must be positive, num_classes >= 0")
        if problems:
            raise ValueError("invalid SwinConfig: " + "; ".join(problems))

    @property
    def img_hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def replace(self, **overrides) -> SwinConfig:
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown SwinConfig field(s) {unknown}; valid fields: {[f.name for f in fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> SwinConfig:
        return cls().replace(**values)
