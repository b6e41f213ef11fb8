"""benchmarks/detect_bench.py: its timm peer detector computes what ours does, and its main entry runs.

Timings are never asserted: the run only has to finish and write its CSV.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from helpers import max_diff, one_thread, randomize  # noqa: F401  (one_thread is a fixture)
from swinx.detection.model import create_detector

pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "drop_path_rate": 0.0}
TOL = 1e-4
_spec = importlib.util.spec_from_file_location(
    "detect_bench", Path(__file__).parents[1] / "benchmarks" / "detect_bench.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def detector_pair(kind: str, window: int, img_hw: tuple[int, int], seed: int = 0):
    torch.manual_seed(seed)
    ours = create_detector(f"{kind}_swin_t_fpn", 5, fpn_channels=32, backbone_args={**TINY, "window_size": window})
    randomize(ours.backbone, seed)  # every trunk, output-norm and FPN parameter away from its init
    return ours.eval(), bench.timm_detector(ours, "swin_t", img_hw).eval()


@pytest.mark.parametrize(
    "kind, window, size",
    [
        ("maskrcnn", 7, (224, 224)),  # swin_t's own geometry: 56, 28, 14, 7 (the last map is one window)
        ("maskrcnn", 4, (256, 384)),  # rectangular, every map a multiple of the window
        ("retinanet", 4, (128, 128)),  # P3-P7 pyramid: the timm body feeds stages 1-3 only
    ],
)
def test_timm_peer_has_same_maps(kind, window, size):
    ours, peer = detector_pair(kind, window, size)
    assert bench.timm_matches(ours.backbone.body.config, size)
    theirs, mine = dict(peer.named_parameters()), dict(ours.named_parameters())
    assert sum(p.numel() for p in theirs.values()) == sum(p.numel() for p in mine.values())
    trunk = lambda name: name.startswith("backbone.body.") and not name.split(".")[2].startswith("norm")
    for name in filter(lambda n: not trunk(n), mine):  # heads, FPN and output norms: copies, same names
        assert torch.equal(mine[name], theirs[name]), name
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a_body, b_body = ours.backbone.body(x), peer.backbone.body(x)
        a_fpn, b_fpn = ours.backbone.fpn(a_body), peer.backbone.fpn(b_body)
    assert list(a_body) == list(b_body) and list(a_fpn) == list(b_fpn)
    for key in a_body:
        assert a_body[key].abs().max() > 0.1  # non-trivial maps
        assert max_diff(a_body[key], b_body[key]) < TOL, key
    for key in a_fpn:
        assert max_diff(a_fpn[key], b_fpn[key]) < TOL, key
    assert max(bench.compare_features(ours, peer, x)) < TOL


def test_sizes_where_timm_differs():
    """timm pads after the cyclic shift and clamps windows per axis: only whole-window maps agree."""
    config = create_detector("maskrcnn_swin_t_fpn", 5, backbone_args=TINY).backbone.body.config
    assert bench.timm_matches(config, (224, 224)) and bench.timm_matches(config, (448, 448))
    assert not bench.timm_matches(config, (320, 320))  # 80 px map: not a multiple of 7
    assert not bench.timm_matches(config, (224, 448))  # last map 7x14: timm shifts along one axis
    assert bench.matching_size(config) == (224, 224)
    with pytest.raises(ValueError, match="smaller than the window"):
        bench.timm_trunk(
            "swin_t", create_detector("maskrcnn_swin_t_fpn", 5, backbone_args=TINY).backbone.body, (128, 128)
        )


def test_main_writes_csv(tmp_path, capsys):
    out = tmp_path / "detect.csv"
    rows = bench.main(
        [
            "--size",
            "128",
            "--batch",
            "1",
            "--fpn-channels",
            "16",
            "--num-classes",
            "3",
            "--seconds",
            "0.1",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
            "--backbone-args",
            "embed_dim=16,depths=2-2-2-2,num_heads=1-2-4-8,window_size=4",
            "--detector-args",
            (
                "rpn_pre_nms_top_n_train=200,rpn_post_nms_top_n_train=100,"
                "rpn_pre_nms_top_n_test=100,rpn_post_nms_top_n_test=50,box_batch_size_per_image=32,"
                "box_detections_per_img=10"
            ),
        ]
    )
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert [(r["mode"], r["impl"]) for r in written] == [
        ("train", "swinx"),
        ("train", "timm"),
        ("infer", "swinx"),
        ("infer", "timm"),
    ]
    assert len(rows) == 4
    for r in written:
        assert r["check"] == "pass" and float(r["check_fpn_max_diff"]) < TOL
        assert float(r["images_per_second"]) > 0 and float(r["ratio_swinx_over_timm"]) > 0
        assert r["threads"] == "1" and r["torch"] == torch.__version__ and r["cpu"]
    assert "swinx/timm" in capsys.readouterr().out
