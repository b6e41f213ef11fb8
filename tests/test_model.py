"""Model behaviour: any input size, fast vs exact attention, checkpointing, modes, caching, bad input."""

from __future__ import annotations

import pytest
import torch

import swinx
import swinx.model.attention
from helpers import SMALL, max_diff, randomize
from swinx.model.windows import shift_mask


def small(version: int = 1, **overrides) -> swinx.SwinTransformer:
    name = "swin_t" if version == 1 else "swinv2_t"
    settings = {**SMALL, "num_classes": 5, "drop_path_rate": 0.0, **overrides}
    return randomize(swinx.create_model(name, **settings)).eval()


SIZES = [(224, 224), (200, 312), (97, 131), (33, 65), (17, 23), (4, 4), (1000 // 8, 61)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_input_size(version, size):
    model = small(version)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_intermediates(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    for i, f in enumerate(features):
        assert f.shape == (2, 32 * 2**i, h, w)
        h, w = -(-h // 2), -(-w // 2)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("small_map", ["clamp", "pad"])
@pytest.mark.parametrize("size", [(224, 224), (200, 312), (60, 44)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_and_exact_attention_agree(version, small_map, size):
    model = small(version, small_map=small_map)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attn(False)
        exact = model(x)
    assert max_diff(fused, exact) < 1e-5


def test_exact_path_returns_attention_maps_that_respect_the_mask():
    model = small(1)
    block = model.layers[0].blocks[1]  # shifted
    x = torch.randn(1, 28, 28, 32)
    with torch.no_grad():
        out, attn = block.window_attention(x, return_attn=True)
        assert torch.allclose(out, block.window_attention(x), atol=1e-5)
    assert attn.shape == (1, 16, 1, 49, 49)
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    mask = shift_mask(28, 28, (7, 7), (3, 3))
    assert (attn[0, :, 0][mask < 0] < 1e-30).all()  # masked pairs get no weight


def test_padding_never_wraps_into_shifted_windows():
    """Pad then roll: a token's output depends on nothing outside its region and window."""
    model = small(1)
    block = model.layers[0].blocks[1]
    x = torch.randn(1, 10, 10, 32)  # padded to 14x14, shifted by 3
    y = x.clone()
    y[0, 9, 9] += 10.0  # bottom-right token
    with torch.no_grad():
        a, b = block.window_attention(x), block.window_attention(y)
    changed = (a - b).abs().amax(-1)[0] > 1e-6
    assert changed[9, 9]
    assert not changed[0, 0] and not changed[0, 9] and not changed[9, 0]  # far corners: other windows or regions


def test_grad_checkpointing_same_outputs_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    grads = []
    for enable in (False, True):
        model = small(2).train()
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert max_diff(grads[0][0], grads[1][0]) < 1e-6
    for name, g in grads[0][1].items():
        assert max_diff(g, grads[1][1][name]) < 1e-5, name


def test_train_mode_uses_dropout_and_eval_is_deterministic():
    model = small(1, drop_path_rate=0.3, drop_rate=0.2, attn_drop_rate=0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: deterministic, run to run
        model.train()
        assert not torch.equal(model(x), model(x))
        torch.manual_seed(5)
        first = model(x)
        torch.manual_seed(5)
        assert torch.equal(first, model(x))  # train: deterministic given the seed


def test_cached_bias_follows_parameter_updates():
    """Inference caches the bias; an optimizer step must invalidate it."""
    model = small(1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    model.train()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "relative_position" in n], lr=10.0)
    model(x).sum().backward()
    opt.step()
    model.eval()
    fresh = swinx.SwinTransformer(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        after, expected = model(x), fresh(x)
    assert max_diff(before, after) > 1e-3 and max_diff(after, expected) < 1e-6


def test_model_built_under_inference_mode():
    with torch.inference_mode():
        model = swinx.create_model("swin_t", **SMALL).eval()
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_masks_are_built_once_per_size(monkeypatch):
    calls = []
    real = swinx.model.attention.shift_mask
    monkeypatch.setattr(swinx.model.attention, "shift_mask", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = small(1)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        first = len(calls)
        model(torch.randn(3, 3, 64, 64))
        assert len(calls) == first > 0
        model(torch.randn(1, 3, 96, 64))
        assert len(calls) > first


def test_reset_classifier_and_pre_logits():
    model = small(1)
    model.reset_classifier(3)
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 3) and model.config.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (1, 256)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 256)


def test_no_weight_decay_names():
    names = small(2).no_weight_decay()
    assert "layers.0.blocks.0.attn.logit_scale" in names and "layers.0.blocks.0.attn.cpb_mlp.0.weight" in names
    assert "layers.0.blocks.0.norm1.weight" in names and "layers.0.blocks.0.attn.q_bias" in names
    assert "layers.0.blocks.0.attn.qkv.weight" not in names and "head.weight" not in names
    assert "layers.1.blocks.0.attn.relative_position_bias_table" in small(1).no_weight_decay()


def test_absolute_position_embedding_any_size():
    model = small(1, ape=True, img_size=64)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
        assert model(torch.randn(1, 3, 96, 40)).shape == (1, 5)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.randn(3, 64, 64), ValueError, "unsqueeze"),
        (torch.randn(1, 1, 64, 64), ValueError, "expected 3 input channels, got 1"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError, "floating-point"),
        (torch.randn(0, 3, 64, 64), ValueError, "empty batch"),
        (torch.randn(1, 3, 3, 64), ValueError, "smaller than one 4x4 patch"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_gets_a_clear_error(x, error, match):
    with pytest.raises(error, match=match):
        small(1)(x)
