"""Detection on torchvision's detectors: the Swin pyramid, the four detectors, `swinx detect` end to end,
resume after SIGKILL, two processes against one, and bad input.

Everything trains a tiny Swin (embed 16) on a few 128-px digit scenes with one thread per process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import swinx
from helpers import one_thread  # noqa: F401 - used through pytestmark
from swinx.cli import main
from swinx.detection import scenes
from swinx.detection.model import NativeSizeTransform, create_detector, set_eval_size, swin_fpn

pytestmark = pytest.mark.usefixtures("one_thread")

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TINY = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
TRAIN = [
    "--model-args",
    json.dumps(TINY),
    "--window-size",
    "4",
    "--fpn-channels",
    "64",
    "--train-sizes",
    "96",
    "128",
    "--max-size",
    "200",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--progress",
    "off",
    "--val-every",
    "1",
    "--warmup-epochs",
    "0.5",
    "--img-size",
    "128",
]


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    return scenes.make_scenes(root, train_scenes=16, val_scenes=6, size=128, digits=(1, 3), scale=(24, 48), seed=3)


def detect_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return ["detect", "train", "--data", str(data), "--out", str(out), *TRAIN, *extra]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The model


def test_swin_fpn_under_plain_torchvision_mask_rcnn():
    """The issue's one-liner: torchvision's own MaskRCNN class on our pyramid, any input size."""
    backbone = swin_fpn("swin_t", **TINY, window_size=4)
    assert backbone.out_channels == 256 and backbone.body.strides == [4, 8, 16, 32]
    model = torchvision.models.detection.MaskRCNN(backbone, num_classes=91, min_size=200, max_size=400).eval()
    maps = backbone(torch.rand(1, 3, 200, 312))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(50, 78), (25, 39), (13, 20), (7, 10), (4, 5)]
    with torch.no_grad():
        out = model([torch.rand(3, 200, 312)])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn", "retinanet", "fcos"])
def test_every_detector_trains_and_keeps_the_image_size(kind):
    model = create_detector(
        f"{kind}_swin_t_fpn", num_classes=5, fpn_channels=32, backbone_args=dict(TINY, window_size=4)
    )
    assert isinstance(model.transform, NativeSizeTransform)
    images = [torch.rand(3, 100, 150), torch.rand(3, 90, 70)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10, 40, 50]]),
            "labels": torch.tensor([2]),
            "masks": torch.zeros(1, 100, 150, dtype=torch.uint8),
        },
        {
            "boxes": torch.tensor([[5.0, 20, 30, 60]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 90, 70, dtype=torch.uint8),
        },
    ]
    # Not rescaled to 800 px (torchvision's default); only padded into a batch.
    batch, _ = model.transform(images)
    assert batch.image_sizes == [(100, 150), (90, 70)]
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.patch_embed.proj.weight.grad is not None
    model.eval()
    set_eval_size(model, (224, 160))  # every image resized to 224x160, boxes mapped back
    batch, _ = model.transform(images)
    assert batch.image_sizes == [(224, 160), (224, 160)]
    with torch.no_grad():
        out = model(images)
    for o, image in zip(out, images):
        if len(o["boxes"]):
            assert o["boxes"][:, 2].max() <= image.shape[2] + 1e-3 and o["boxes"][:, 3].max() <= image.shape[1] + 1e-3


def test_unknown_detector_name_says_what_exists():
    with pytest.raises(KeyError, match="maskrcnn_swin_t_fpn"):
        create_detector("yolo_swin_t_fpn")


# ---------------------------------------------------------------------------------------------
# swinx detect, end to end


@pytest.fixture(scope="module")
def trained(scene_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "maskrcnn"
    assert (
        main(detect_cmd(scene_dir, run, "--detector", "maskrcnn", "--epochs", "2", "--eval-sizes", "160", "150x100"))
        == 0
    )
    return run


def test_train_writes_the_run_directory(trained):
    rows = rows_of(trained)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["val_AP"] <= 1 and 0 <= r["val_mask_AP"] <= 1 and r["val_AP50"] >= r["val_AP"]
        assert r["data_fixes"]["train"]["dropped_boxes"] == 0
    for name in ("config.yaml", "last.safetensors", "best.safetensors", "last.state.pt", "curves.png", "eval.json"):
        assert (trained / name).is_file(), name
    evaluations = json.loads((trained / "eval.json").read_text())["evaluations"]
    assert [e["img_size"] for e in evaluations] == ["128x128", "160x160", "150x100"]
    assert all(set(e) >= {"bbox", "segm"} for e in evaluations)


def test_eval_json_has_pycocotools_names(trained, scene_dir, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "detect",
                "eval",
                "--checkpoint",
                str(trained),
                "--data",
                str(scene_dir),
                "--img-size",
                "150x100",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert set(report["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert set(report["segm"]) >= {"AP", "AP50"} and report["img_size"] == "150x100"
    assert all(-1 <= report["bbox"][k] <= 1 for k in ("AP", "AP50", "AP75"))
    assert list(report["bbox"]["per_class"]) == [str(d) for d in range(10)]
    # The run's own evaluation of the same weights at the same size agrees.
    recorded = json.loads((trained / "eval.json").read_text())["evaluations"][2]
    assert report["bbox"]["AP"] == pytest.approx(recorded["bbox"]["AP"], abs=1e-9)


def test_predict_any_format_and_draw(trained, scene_dir, tmp_path, capsys):
    source = Image.open(next((scene_dir / "val").glob("*.png")))
    gray, rgba, jpeg = tmp_path / "gray.png", tmp_path / "rgba.png", tmp_path / "photo.jpg"
    source.convert("L").resize((150, 97)).save(gray)
    source.convert("RGBA").save(rgba)
    source.convert("RGB").save(jpeg, quality=90)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    capsys.readouterr()
    code = main(
        [
            "detect",
            "predict",
            "--checkpoint",
            str(trained),
            str(gray),
            str(rgba),
            str(jpeg),
            str(broken),
            "--threshold",
            "0",
            "--draw",
            str(tmp_path / "drawn"),
            "--json",
        ]
    )
    assert code == 1  # one image could not be read; the others are answered
    results = json.loads(capsys.readouterr().out)
    assert "error" in results[3] and "broken.png" in results[3]["image"]
    assert results[0]["width"] == 150 and results[0]["height"] == 97
    for r in results[:3]:
        assert Image.open(r["drawing"]).size == (r["width"], r["height"])
        for d in r["detections"]:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= r["width"] and 0 <= y0 <= y1 <= r["height"]
            assert d["class"] in [str(c) for c in range(10)] and "mask_area" in d


def test_init_from_a_classification_run(scene_dir, tmp_path, capsys):
    """`swinx train`'s weights (same variant) initialise the backbone; the report says the head was dropped."""
    classifier = swinx.create_model("swin_t", **TINY, window_size=4, num_classes=10)
    swinx.save_model(classifier, tmp_path / "cls.safetensors")
    capsys.readouterr()
    assert (
        main(
            detect_cmd(
                scene_dir,
                tmp_path / "run",
                "--epochs",
                "1",
                "--init",
                str(tmp_path / "cls.safetensors"),
                "--lr",
                "1e-9",
                "--min-lr",
                "0",
            )
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "initialised from" in out and "head" in out
    from safetensors.torch import load_file

    trained = load_file(tmp_path / "run" / "last.safetensors")
    source = classifier.state_dict()
    w = "layers.0.blocks.0.attn.qkv.weight"
    assert torch.allclose(trained[f"backbone.body.{w}"], source[w], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Resume, DDP


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(scene_dir, tmp_path):
    base = [PYTHON, "-m", "swinx", *detect_cmd(scene_dir, tmp_path / "x", "--epochs", "3")][:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    cmd = base.copy()
    cmd[cmd.index("--out") + 1] = str(full)
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    cmd[cmd.index("--out") + 1] = str(killed)
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # metrics.jsonl is written first in an epoch's save: two lines = inside epoch 2's save, epoch 1's state on disk.
    while not ((killed / "metrics.jsonl").exists() and (killed / "metrics.jsonl").read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    subprocess.run(
        [PYTHON, "-m", "swinx", "detect", "train", "--resume", str(killed)], check=True, env=env, capture_output=True
    )
    a, b = rows_of(full), rows_of(killed)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_AP", "val_AP50", "lr"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (key, ra, rb)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(scene_dir, tmp_path):
    """gloo, 2 x batch 2 against 1 x batch 4: the same images and sizes per step, weights in sync.

    torchvision's detection losses are normalised by counts within each process's batch (FCOS
    by its foreground points), so the averaged gradients of two processes differ slightly from
    one process's: the runs agree closely, not bit for bit.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(
        [PYTHON, "-m", "swinx", *detect_cmd(scene_dir, one, "--epochs", "2")], check=True, env=env, capture_output=True
    )
    two = tmp_path / "two"
    cmd = [
        TORCHRUN,
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "swinx",
        *detect_cmd(scene_dir, two, "--epochs", "2"),
    ]
    cmd[cmd.index("--batch-size") + 1] = "2"
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    a, b = rows_of(one), rows_of(two)
    assert all(r["ranks_in_sync"] for r in b)
    assert a[0]["train_loss"] == pytest.approx(b[0]["train_loss"], rel=0.05)
    assert a[-1]["val_AP50"] == pytest.approx(b[-1]["val_AP50"], abs=0.15)


# ---------------------------------------------------------------------------------------------
# Bad input


def _coco(root: Path, images: list[dict], annotations: list[dict], categories=None) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train").mkdir(exist_ok=True)
    for im in images:
        path = root / "train" / im["file_name"]
        if not path.exists():
            Image.fromarray(np.random.default_rng(im["id"]).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    doc = {
        "images": images,
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    (root / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    return root


def _image(i: int) -> dict:
    return {"id": i, "file_name": f"{i}.png", "width": 80, "height": 64}


def _ann(i: int, image: int, box, cat: int = 3) -> dict:
    return {"id": i, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}


@pytest.mark.parametrize(
    "case, message",
    [
        ("not json", "not valid JSON"),
        ("no images", "missing 'images'"),
        ("missing image id", "image"),
        ("missing file", "missing"),
    ],
)
def test_unusable_coco_files_fail_with_one_line(case, message, tmp_path, capsys):
    root = tmp_path / "data"
    _coco(root, [_image(1), _image(2)], [_ann(1, 1, [5, 5, 20, 20])])
    ann = root / "annotations" / "instances_train.json"
    if case == "not json":
        ann.write_text("{ this is not json")
    elif case == "no images":
        ann.write_text(json.dumps({"annotations": [], "categories": []}))
    elif case == "missing image id":
        _coco(root, [_image(1)], [_ann(1, 1, [5, 5, 20, 20]), _ann(2, 99, [5, 5, 20, 20])])
    else:
        (root / "train" / "2.png").unlink()
    capsys.readouterr()
    assert main(["detect", "train", "--data", str(root), "--out", str(tmp_path / "run"), *TRAIN, "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("swinx detect train: error:") and message in err[0], err


def test_blemishes_are_fixed_counted_and_recorded(tmp_path, capsys):
    """Boxes outside the image clipped, empty boxes dropped, unknown categories dropped, images without
    objects kept, non-contiguous category ids mapped, a corrupt image skipped: all counted."""
    root = _coco(
        tmp_path / "data",
        [_image(i) for i in range(1, 9)],
        [
            _ann(1, 1, [60, 40, 40, 40]),  # reaches outside the 80x64 image: clipped
            _ann(2, 2, [10, 10, 0, 15]),  # zero width: dropped
            _ann(3, 3, [10, 10, 20, 20], cat=5),  # unknown category: dropped
            _ann(4, 4, [5, 5, 30, 30], cat=7),
            _ann(5, 5, [20, 10, 30, 30]),
            _ann(6, 6, [1, 1, 10, 10], cat=7),
        ],
    )  # images 7, 8: no objects (negatives)
    (root / "train" / "8.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    shutil.copytree(root / "train", root / "val")
    (root / "annotations" / "instances_val.json").write_text(
        (root / "annotations" / "instances_train.json").read_text()
    )
    capsys.readouterr()
    run = tmp_path / "run"
    assert (
        main(["detect", "train", "--data", str(root), "--out", str(run), *TRAIN, "--epochs", "1", "--batch-size", "2"])
        == 0
    )
    captured = capsys.readouterr()
    err = captured.err
    # A user's data with no model or recipe chosen: the settings are fitted, said, and timed.
    assert "picked a small swin_t" in captured.out and "estimated training time" in captured.out
    assert "clipped 1 box" in err and "dropped 1 box" in err and "category_id" in err and "unreadable" in err
    row = rows_of(run)[0]
    fixes = row["data_fixes"]["train"]
    assert fixes["clipped_boxes"] == 1 and fixes["dropped_boxes"] == 1 and fixes["unknown_category"] == 1
    assert fixes["negative_images"] == 4  # images 2, 3 (their only box went), 7 and 8
    assert row["skipped_images"] >= 2  # the corrupt image, in training and in validation
    eval_report = json.loads((run / "eval.json").read_text())["evaluations"][0]
    assert list(eval_report["bbox"]["per_class"]) == ["cat", "dog"]


def test_init_from_another_variant_fails_with_one_line(scene_dir, tmp_path, capsys):
    other = swinx.create_model("swin_t", embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4)
    swinx.save_model(other, tmp_path / "other.safetensors")
    capsys.readouterr()
    assert (
        main(detect_cmd(scene_dir, tmp_path / "run", "--epochs", "1", "--init", str(tmp_path / "other.safetensors")))
        == 2
    )
    err = capsys.readouterr().err.strip()
    # One error, headed by one line; the checkpoint report under it says what differs.
    assert err.startswith("swinx detect train: error: --init") and err.count("error:") == 1, err
    assert "embed" in err and "other.safetensors" in err.splitlines()[0], err
