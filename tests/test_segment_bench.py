"""benchmarks/segment_bench.py: its timm peer segmenter computes what ours does, and its main entry runs.

Timings are never asserted: the run only has to finish and write its CSV.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import max_diff, one_thread, randomize  # noqa: F401  (one_thread is a fixture)
from swinx.segmentation.model import create_segmenter

pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "drop_path_rate": 0.0}
TOL = 1e-4
_spec = importlib.util.spec_from_file_location(
    "segment_bench", Path(__file__).parents[1] / "benchmarks" / "segment_bench.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def segmenter_pair(window: int, img_hw: tuple[int, int], seed: int = 0):
    torch.manual_seed(seed)
    ours = create_segmenter(
        "upernet_swin_t", 5, channels=32, aux_channels=16, backbone_args={**TINY, "window_size": window}
    )
    randomize(ours, seed)  # every trunk, output-norm and head parameter away from its init
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # BatchNorm scales around 1 (randomize gives 1-D weights ~0.1), or the heads
        for m in ours.modules():  # shrink the trunk's part of the logits below the tolerance
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
    return ours.eval(), bench.timm_segmenter(ours, "swin_t", img_hw).eval()


@pytest.mark.parametrize(
    "window, size",
    [
        (7, (224, 224)),  # swin_t's own geometry: 56, 28, 14, 7 (the last map is one window)
        (4, (256, 384)),  # rectangular, every map a multiple of the window, shifted windows in every stage
    ],
)
def test_timm_peer_has_same_logits(window, size):
    ours, peer = segmenter_pair(window, size)
    assert bench.detect.timm_matches(ours.backbone.config, size)
    theirs, mine = dict(peer.named_parameters()), dict(ours.named_parameters())
    assert sum(p.numel() for p in theirs.values()) == sum(p.numel() for p in mine.values())
    trunk = lambda name: name.startswith("backbone.") and not name.split(".")[1].startswith("norm")
    for name in filter(lambda n: not trunk(n), mine):  # heads and output norms: copies, same names
        assert torch.equal(mine[name], theirs[name]), name
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a_maps, b_maps = ours.backbone(x), peer.backbone(x)
        a, b = ours(x)["out"], peer(x)["out"]
    assert list(a_maps) == list(b_maps) == ["0", "1", "2", "3"]
    for key in a_maps:
        assert a_maps[key].shape == b_maps[key].shape  # NCHW, like ours
        assert max_diff(a_maps[key], b_maps[key]) < TOL, key
    assert a.shape == (2, 5, *size) and a.abs().max() > 0.5  # non-trivial logits
    assert max_diff(a, b) < TOL
    assert max(bench.compare_logits(ours, peer, x[:1])) < TOL
    with torch.no_grad():  # the check has teeth: 1 % off one weight of the last stage shows in the logits
        peer.backbone.trunk.layers_3.blocks[1].attn.qkv.weight.mul_(1.01)
    assert bench.compare_logits(ours, peer, x[:1])[1] > 10 * TOL


def test_check_size():
    config = create_segmenter("upernet_swin_t", 5, channels=16, aux_channels=None, backbone_args=TINY).backbone.config
    assert bench.check_size(config, (224, 224)) == (224, 224)
    assert bench.check_size(config, (512, 512)) == (448, 448)  # the largest matching size within
    assert bench.check_size(config, (512, 1024)) == (448, 896)
    assert bench.check_size(config, (256, 512)) == (224, 224)  # 224x448 would leave a 7x14 last map


def test_main_writes_csv(tmp_path, capsys):
    out = tmp_path / "segment.csv"
    rows = bench.main(
        [
            "--size",
            "256",  # not a timm-matching size: the check runs at 224, the 256 difference is printed
            "--batch",
            "2",
            "--channels",
            "16",
            "--aux-channels",
            "8",
            "--num-classes",
            "3",
            "--seconds",
            "0.05",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
            "--backbone-args",
            "embed_dim=16,depths=2-2-2-2,num_heads=1-2-4-8",
        ]
    )
    with open(out) as f:
        reader = csv.DictReader(f)
        written = list(reader)
    assert reader.fieldnames == bench.FIELDS
    assert [(r["mode"], r["impl"]) for r in written] == [
        ("train", "swinx"),
        ("train", "timm"),
        ("infer", "swinx"),
        ("infer", "timm"),
    ]
    assert len(rows) == 4
    for r in written:
        assert r["check"] == "pass" and r["check_size"] == "224x224" and float(r["check_logits_max_diff"]) < TOL
        assert float(r["timing_size_logits_max_diff"]) >= 0
        assert float(r["images_per_second"]) > 0 and float(r["ratio_swinx_over_timm"]) > 0
        assert r["threads"] == "1" and r["torch"] == torch.__version__ and r["cpu"]
    printed = capsys.readouterr().out
    assert "swinx/timm" in printed and "for information" in printed


def test_batch_norm_training_needs_two_images():
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "1", "--mode", "train"])
    assert bench.parse_args(["--batch", "1", "--mode", "infer"]).batch == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--size", "500"])  # not a multiple of 32
