"""The official Microsoft code's own outputs (tests/fixtures/official, copied from shared/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import swinx
from helpers import max_diff

FIXTURES = Path(__file__).parent.parent / "fixtures" / "official"
CASES = json.loads((FIXTURES / "cases.json").read_text())


def load_case(name: str):
    io = torch.load(FIXTURES / f"{name}.io.pt", weights_only=True)
    model = swinx.SwinTransformer(swinx.SwinConfig(version=2 if io["kind"] == "v2" else 1, **io["config"])).eval()
    report = swinx.load_checkpoint(model, FIXTURES / f"{name}.pth")
    return model, io, report


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "exact"])
def test_logits_and_stage_outputs(name, fused):
    model, io, report = load_case(name)
    assert report.layout == "official" and report.ignored_buffers
    assert sum(p.numel() for p in model.parameters()) == CASES[name]["params"]
    model.set_fused_attn(fused)
    with torch.no_grad():
        logits = model(io["input"])
        features = model.forward_intermediates(io["input"])
    assert max_diff(logits, io["logits"]) < 1e-4
    assert len(features) == len(io["features"]) == 4
    for ours, theirs in zip(features, io["features"]):
        assert max_diff(ours.flatten(2).transpose(1, 2), theirs) < 1e-4  # (B, C, H, W) -> official (B, HW, C)
