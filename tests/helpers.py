"""Shared test helpers: small configs and full randomisation of every parameter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def one_thread():
    """Two intra-op threads on a 2-core machine make tiny training runs ~20x slower; use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random value (not the default init), so any wrong key, order or layout shows.

    LayerNorm weights around 1, V2 temperatures around log(10), bias tables with unit
    variance, matrices scaled by 1/sqrt(fan_in) so activations stay in range.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "logit_scale" in name:
            p.copy_(math.log(10) + 0.5 * noise)
        elif "relative_position_bias_table" in name:
            p.copy_(noise)
        elif p.ndim == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        elif p.ndim == 1 or name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(noise / math.sqrt(fan_in))
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
