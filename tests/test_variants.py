"""Named variants: exact parameter counts (REFERENCE.md), aliases, config validation."""

from __future__ import annotations

import pytest
import torch

import swinx

PARAMS = {
    "swin_t": 28_288_354,
    "swin_s": 49_606_258,
    "swin_b": 87_768_224,
    "swin_l": 196_532_476,
    "swin_base_patch4_window12_384": 87_903_584,
    "swin_large_patch4_window12_384": 196_735_516,
    "swinv2_t": 28_347_154,
    "swinv2_s": 49_728_418,
    "swinv2_b": 87_918_816,
    "swinv2_tiny_window16_256": 28_347_154,
    "swinv2_base_window16_256": 87_918_816,
    "swinv2_l": 196_739_932,
    "swinv2_large_window12to24_192to384": 196_739_932,
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_exact_parameter_count(name):
    with torch.device("meta"):  # counting needs shapes only
        model = swinx.create_model(name)
    assert count(model) == PARAMS[name]


def test_every_listed_name_builds():
    names = swinx.list_models()
    assert {"swin_t", "swin_s", "swin_b", "swin_l", "swinv2_t", "swinv2_s", "swinv2_b", "swinv2_l"} <= set(names)
    for official in (
        "swin_tiny_patch4_window7_224",
        "swin_base_patch4_window12_384",
        "swinv2_tiny_window8_256",
        "swinv2_base_window12to24_192to384",
        "swinv2_small_window16_256",
        "swin_large_patch4_window7_224_22k",
    ):
        assert official in names
    with torch.device("meta"):
        for name in names:
            cfg = swinx.create_model(name).config
            assert cfg.window_size in (7, 8, 12, 16, 24) and cfg.num_classes in (1000, 21841)


def test_aliases_resolve_to_the_published_configs():
    cfg = swinx.get_config("swinv2_base_window12to24_192to384")
    assert (cfg.version, cfg.embed_dim, cfg.window_size, cfg.img_size) == (2, 128, 24, 384)
    assert cfg.pretrained_window_sizes == (12, 12, 12, 6)
    cfg = swinx.get_config("swin_base_patch4_window12_384")
    assert (cfg.version, cfg.embed_dim, cfg.window_size, cfg.img_size, cfg.depths) == (1, 128, 12, 384, (2, 2, 18, 2))
    assert swinx.get_config("swin_tiny_patch4_window7_224_22k").num_classes == 21841


def test_overrides_and_unknown_names():
    model = swinx.create_model("swin_t", num_classes=10, embed_dim=48)
    assert model.head.out_features == 10 and model.patch_embed.proj.out_channels == 48
    with pytest.raises(ValueError, match="unknown model 'swin_q'"):
        swinx.create_model("swin_q")
    with pytest.raises(TypeError, match="unknown SwinConfig field"):
        swinx.create_model("swin_t", windowsize=7)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(depths=(2, 2), num_heads=(3, 6, 12)), "differ in length"),
        (dict(num_heads=(5, 6, 12, 24)), "not divisible"),
        (dict(version=3), "version must be 1 or 2"),
        (dict(small_map="crop"), "small_map must be one of"),
        (dict(pretrained_window_sizes=(12, 12)), "one entry per stage"),
    ],
)
def test_invalid_config_is_rejected_with_reason(bad, match):
    with pytest.raises(ValueError, match=match):
        swinx.SwinConfig(**bad)


def test_config_dict_round_trip():
    cfg = swinx.get_config("swinv2_l", num_classes=3)
    assert swinx.SwinConfig.from_dict(cfg.to_dict()) == cfg
