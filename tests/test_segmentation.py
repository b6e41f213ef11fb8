"""Semantic segmentation: UperNet at any size, whole and sliding inference, joint transforms, the ignore
index, mIoU, `swinx segment` end to end, resume after SIGKILL, two processes against one, and bad input.

Everything trains a tiny Swin (embed 16) on a few 96-px digit scenes with one thread per process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

import swinx
from helpers import one_thread, randomize  # noqa: F401 - one_thread used through pytestmark
from swinx.cli import main
from swinx.segmentation import data as D
from swinx.segmentation import scenes
from swinx.segmentation.evaluate import confusion_matrix, metrics
from swinx.segmentation.inference import InferenceSettings, predict_logits, slide_logits
from swinx.segmentation.model import create_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TINY = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
TRAIN = [
    "--model-args",
    json.dumps(TINY),
    "--window-size",
    "4",
    "--channels",
    "32",
    "--aux-channels",
    "16",
    "--crop-size",
    "64",
    "--base-size",
    "96",
    "--ratio-range",
    "0.75",
    "1.25",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--progress",
    "off",
    "--warmup-epochs",
    "0.5",
    "--img-size",
    "96",
    "--eval-crop",
    "64",
    "--eval-stride",
    "48",
    "--eval-sizes",
    "80x100",
]


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("segscenes")
    return scenes.make_scenes(root, train_scenes=16, val_scenes=6, size=96, digits=(1, 3), scale=(24, 48), seed=3)


def segment_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return ["segment", "train", "--data", str(data), "--out", str(out), *TRAIN, *extra]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tiny(num_classes=5, **kw) -> torch.nn.Module:
    args = dict(channels=16, aux_channels=8, backbone_args=dict(TINY, window_size=4, **kw.pop("backbone_args", {})))
    return create_segmenter(kw.pop("name", "upernet_swin_t"), num_classes, **{**args, **kw})


# ---------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("name", ["upernet_swin_t", "upernet_swinv2_t"])
def test_logits_keep_any_input_size(name):
    model = randomize(tiny(name=name)).eval()
    for h, w in [(64, 64), (75, 113), (33, 190)]:
        out = model(torch.rand(2, 3, h, w))
        assert list(out) == ["out"] and out["out"].shape == (2, 5, h, w)
    model.train()
    out = model(torch.rand(2, 3, 75, 113))
    assert set(out) == {"out", "aux"} and out["aux"].shape == (2, 5, 75, 113)


def test_paper_sized_model_and_its_parts():
    """UperNet Swin-T for ADE20K's 150 classes: about the paper's 60M parameters, 512 decoder channels,
    pool scales 1-2-3-6, the auxiliary head on stage 3 (384 channels)."""
    model = create_segmenter("upernet_swin_t", 150)
    params = sum(p.numel() for p in model.parameters())
    assert 59.5e6 < params < 60.5e6, params
    assert model.decode_head.ppm.scales == (1, 2, 3, 6)
    assert model.decode_head.classifier.in_channels == 512 and model.decode_head.classifier.out_channels == 150
    assert model.auxiliary_head.convs[0][0].in_channels == 384
    assert create_segmenter("upernet_swin_t", 150, aux_channels=None).auxiliary_head is None


def test_unknown_segmenter_name_says_what_exists():
    with pytest.raises(KeyError, match="upernet_<swin variant>"):
        create_segmenter("upernet_resnet50", 3)


def test_init_from_an_openmmlab_backbone_checkpoint():
    """mmsegmentation's Swin backbone keys are the OpenMMLab layout: the fixture loads into the
    segmenter's backbone and reproduces mmpretrain's four outputs."""
    fixtures = Path(__file__).parent / "fixtures" / "openmmlab"
    io = torch.load(fixtures / "mm_v1_w7.io.pt", weights_only=True)
    arch = io["mm_args"]["arch"]
    backbone_args = dict(
        embed_dim=arch["embed_dims"], depths=arch["depths"], num_heads=arch["num_heads"], window_size=7, img_size=224
    )
    model = create_segmenter("upernet_swin_t", 4, channels=16, aux_channels=8, backbone_args=backbone_args).eval()
    report = swinx.load_checkpoint(model.backbone, fixtures / "mm_v1_w7.pth")
    assert report.layout == "openmmlab" and report.fresh == []
    with torch.no_grad():
        out = model.backbone(io["input"])
        assert model(io["input"][:, :, :100, :150])["out"].shape == (2, 4, 100, 150)
    for i, theirs in enumerate(io["outputs"]):
        assert (out[str(i)] - theirs).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# Inference


@torch.no_grad()
def test_slide_with_a_window_covering_the_image_equals_whole():
    model = randomize(tiny()).eval()
    image = torch.rand(3, 70, 101)
    whole = predict_logits(model, [image], InferenceSettings(mode="whole"))[0]
    for crop in [(70, 101), (128, 128)]:
        slide = predict_logits(model, [image], InferenceSettings(mode="slide", crop=crop, stride=(40, 40)))[0]
        assert torch.equal(slide, whole)
    assert whole.shape == (5, 70, 101)


@torch.no_grad()
def test_slide_averages_the_overlapping_windows():
    model = randomize(tiny()).eval()
    image = torch.rand(3, 64, 96)
    out = slide_logits(model, image, (64, 64), (32, 32))
    windows = [model(image[None, :, :, x : x + 64])["out"][0] for x in (0, 32)]
    assert torch.allclose(out[:, :, :32], windows[0][:, :, :32], atol=1e-5)
    assert torch.allclose(out[:, :, 32:64], (windows[0][:, :, 32:] + windows[1][:, :, :32]) / 2, atol=1e-5)
    assert torch.allclose(out[:, :, 64:], windows[1][:, :, 32:], atol=1e-5)


@torch.no_grad()
def test_resized_flipped_and_multiscale_predictions_come_back_at_the_input_size():
    model = randomize(tiny()).eval()
    images = [torch.rand(3, 61, 83), torch.rand(3, 61, 83), torch.rand(3, 40, 50)]
    settings = InferenceSettings(size=(96, 96), scales=[0.75, 1.0], flip=True, batch_size=2)
    out = predict_logits(model, images, settings)
    assert [tuple(o.shape) for o in out] == [(5, 61, 83), (5, 61, 83), (5, 40, 50)]
    assert torch.allclose(out[0].sum(0), torch.ones(61, 83), atol=1e-5)  # mean of softmax probabilities
    single = predict_logits(model, images[2:], settings)[0]
    assert torch.allclose(single, out[2], atol=1e-5)  # batching does not change an image's answer


# ---------------------------------------------------------------------------------------------
# Data: joint transforms, the ignore index, metrics


def test_joint_transforms_keep_image_and_mask_aligned():
    """Labels are a function of pixel position (8x8 blocks, label (bx + 2 by) % 7) and the image
    encodes the label in its red channel: after random rescale, crop and flip, every labelled pixel
    away from block borders still reads its own label, and the padding is the ignore index."""
    h, w = 96, 128
    ys, xs = np.mgrid[0:h, 0:w]
    labels = ((xs // 8) + 2 * (ys // 8)) % 7
    image = np.zeros((3, h, w), dtype=np.uint8)
    image[0] = labels * 30 + 10
    image[1] = (xs * 2) % 256
    transforms = D.train_transforms((112, 112), base=96, ratio=(0.5, 1.5), hflip=0.5, photometric=False)
    torch.manual_seed(0)
    agree, padded = [], 0
    for _ in range(12):
        img, mask = transforms(tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(labels)))
        assert img.dtype == torch.float32 and mask.dtype == torch.int64 and img.shape[-2:] == mask.shape == (112, 112)
        decoded = torch.round((img[0] * 255 - 10) / 30).long()
        inner = mask == F.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].long()  # not next to a border
        inner &= mask == -F.max_pool2d(-mask[None, None].float(), 3, 1, 1)[0, 0].long()
        keep = inner & (mask != D.IGNORE_INDEX)
        agree.append((decoded[keep] == mask[keep]).float().mean().item())
        padded += int((mask == D.IGNORE_INDEX).sum())
        assert torch.all(img[:, mask == D.IGNORE_INDEX] == 0)
    assert min(agree) > 0.99, agree
    assert padded > 0  # some crops were larger than the rescaled image


def test_ignore_index_is_ignored_by_the_loss_and_the_metrics(scene_dir):
    from swinx.segmentation.train import SegmentationTask, resolve_config

    cfg = resolve_config(None, dict(data=str(scene_dir), aux_channels=0, model_args=TINY, window_size=4))
    task = SegmentationTask(cfg)
    net = randomize(tiny(11, aux_channels=None))
    images = torch.rand(2, 3, 32, 32)
    masks = torch.randint(0, 11, (2, 32, 32))
    ignored = masks.clone()
    ignored[:, :16] = 255
    loss_ignored, _ = task.loss(net.eval(), (images, ignored, None), torch.device("cpu"))
    logits = net(images)["out"]
    expected = F.cross_entropy(logits[:, :, 16:], masks[:, 16:])
    assert loss_ignored.item() == pytest.approx(expected.item(), rel=1e-5)
    all_ignored = torch.full_like(masks, 255)
    assert task.loss(net, (images, all_ignored, None), torch.device("cpu"))[0].item() == 0.0
    pred = torch.randint(0, 11, (2, 32, 32))
    other = pred.clone()
    other[:, :16] = (other[:, :16] + 1) % 11  # predictions change only where the label is ignored
    assert torch.equal(confusion_matrix(pred, ignored, 11, 255), confusion_matrix(other, ignored, 11, 255))


def test_metrics_follow_mmsegmentation():
    label = torch.tensor([0, 0, 0, 1, 1, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 3, 2, 0, 3])
    m = metrics(confusion_matrix(pred, label, 4, 255), ["a", "b", "c", "d"])
    # class a: TP 2, FN 1, FP 0 -> IoU 2/3, Acc 2/3; b: TP 1, FN 1, FP 1 -> IoU 1/3, Acc 1/2;
    # c: IoU 1, Acc 1; d: never labelled, predicted once -> IoU 0, Acc undefined.
    assert m["per_class"]["a"] == {"IoU": 66.67, "Acc": 66.67}
    assert m["per_class"]["b"] == {"IoU": 33.33, "Acc": 50.0}
    assert m["per_class"]["d"] == {"IoU": 0.0, "Acc": None}
    assert m["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 3 + 1 + 0) / 4, abs=0.01)
    assert m["mAcc"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3, abs=0.01)
    assert m["aAcc"] == pytest.approx(100 * 4 / 6, abs=0.01)


def test_scenes_are_in_the_folder_convention_with_disjoint_digits(scene_dir):
    train = D.SegmentationFolder(*D.find_split(scene_dir, "train"))
    val = D.SegmentationFolder(*D.find_split(scene_dir, "val"), num_classes=11)
    assert len(train) == 16 and len(val) == 6 and train.num_classes <= 11
    names, palette = D.read_classes(scene_dir / "classes.json")
    assert names == ["background", *"0123456789"] and len(palette) == 11
    assert train.pixels[0] > 5 * train.pixels[1:].sum()  # mostly background, digits present
    again = scenes.make_scenes(scene_dir.parent / "again", train_scenes=16, val_scenes=6, size=96, digits=(1, 3),
                               scale=(24, 48), seed=3)  # fmt: skip
    for a, b in zip(sorted((scene_dir / "annotations").rglob("*.png")), sorted((again / "annotations").rglob("*.png"))):
        assert a.read_bytes() == b.read_bytes()


def test_reduce_zero_label(tmp_path):
    root = _folder(tmp_path, [np.array([[0, 1], [2, 255]], dtype=np.uint8)])
    ds = D.SegmentationFolder(*D.find_split(root, "train"), reduce_zero_label=True)
    _, mask, _ = ds[0]
    assert mask.tolist() == [[255, 0], [1, 255]] and ds.num_classes == 2


# ---------------------------------------------------------------------------------------------
# swinx segment end to end


@pytest.fixture(scope="module")
def trained(scene_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segrun") / "run"
    assert main(segment_cmd(scene_dir, out, "--epochs", "2", "--eval-modes", "whole", "slide")) == 0
    return out


def test_train_writes_the_run_directory(trained):
    for name in ("config.yaml", "metrics.jsonl", "last.safetensors", "best.safetensors", "last.state.pt", "eval.json"):
        assert (trained / name).is_file(), name
    rows = rows_of(trained)
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["val_mIoU"] <= 100 for r in rows)
    evaluations = json.loads((trained / "eval.json").read_text())["evaluations"]
    assert [(e["img_size"], e["mode"]) for e in evaluations] == [
        ("96x96", "whole"),
        ("96x96", "slide"),
        ("80x100", "whole"),
        ("80x100", "slide"),
    ]


def test_eval_json_has_mmsegmentation_names(trained, scene_dir, capsys):
    assert main(["segment", "eval", "--checkpoint", str(trained), "--data", str(scene_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"mIoU", "mAcc", "aAcc", "per_class", "img_size", "mode"}
    assert list(report["per_class"]) == ["background", *"0123456789"]
    assert report["img_size"] == "96x96"
    best = max(r["val_mIoU"] for r in rows_of(trained))
    assert report["mIoU"] == pytest.approx(best, abs=0.01)  # the best weights, scored the same way
    args = ["segment", "eval", "--checkpoint", str(trained), "--data", str(scene_dir), "--img-size", "70x90", "native"]
    assert main([*args, "--mode", "slide", "--crop", "48", "--stride", "32", "--scales", "0.75", "1", "--flip"]) == 0
    text = capsys.readouterr().out
    assert "slide at 70x90, crop 48x48 stride 32x32, scales [0.75, 1.0] + flip: mIoU" in text
    assert "slide at native size" in text


def test_predict_any_format_and_size(trained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (75, 113, 3), dtype=np.uint8)).save(jpg)
    gray = tmp_path / "gray.webp"
    Image.fromarray(rng.integers(0, 255, (50, 61), dtype=np.uint8)).save(gray)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "pred"
    code = main(["segment", "predict", "--checkpoint", str(trained), str(jpg), str(gray), str(broken), "--out",
                 str(out), "--json", "--mode", "slide"])  # fmt: skip
    assert code == 1  # one file could not be read; the others are answered
    results = json.loads(capsys.readouterr().out)
    assert "cannot read image" in results[2]["error"]
    for r, (w, h) in zip(results[:2], [(113, 75), (61, 50)]):
        assert (r["width"], r["height"]) == (w, h)
        assert sum(r["classes"].values()) == pytest.approx(100, abs=0.1)
        index = Image.open(r["mask"])
        assert index.mode == "P" and index.size == (w, h)
        assert Image.open(r["overlay"]).size == (w, h)


def test_a_detector_or_classifier_checkpoint_is_refused(trained, tmp_path, capsys):
    model = swinx.create_model("swin_t", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=3)
    swinx.save_model(model, tmp_path / "cls.safetensors")
    assert main(["segment", "eval", "--checkpoint", str(tmp_path / "cls.safetensors")]) == 2
    assert "not a swinx task checkpoint, not a segmentation one" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Resume, DDP


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(scene_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([PYTHON, "-m", "swinx", *segment_cmd(scene_dir, full, "--epochs", "3")], check=True, env=env,
                   capture_output=True)  # fmt: skip
    cmd = [PYTHON, "-m", "swinx", *segment_cmd(scene_dir, killed, "--epochs", "3")]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # metrics.jsonl is written first in an epoch's save: two lines = inside epoch 2's save, epoch 1's state on disk.
    while not ((killed / "metrics.jsonl").exists() and (killed / "metrics.jsonl").read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    subprocess.run([PYTHON, "-m", "swinx", "segment", "train", "--resume", str(killed)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    a, b = rows_of(full), rows_of(killed)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_mIoU", "val_aAcc", "lr"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (key, ra, rb)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(scene_dir, tmp_path):
    """gloo, 2 x batch 2 against 1 x batch 4. Each sample's crop is drawn from (seed, epoch, index),
    GroupNorm is per image and the loss is a mean over the same pixels, so with dropout and drop
    path off the two runs compute the same steps up to float summation order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    same = ("--epochs", "2", "--norm", "gn", "--dropout", "0", "--drop-path", "0", "--no-photometric")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([PYTHON, "-m", "swinx", *segment_cmd(scene_dir, one, *same)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    cmd = [TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "swinx",
           *segment_cmd(scene_dir, two, *same)]  # fmt: skip
    cmd[cmd.index("--batch-size") + 1] = "2"
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    a, b = rows_of(one), rows_of(two)
    assert all(r["ranks_in_sync"] for r in b)
    # The same steps up to float summation order; the small differences grow over the steps (a fresh
    # CI clone saw 0.5% by the second epoch), so the first epoch is held tighter than the last.
    assert a[0]["train_loss"] == pytest.approx(b[0]["train_loss"], rel=5e-3)
    assert a[-1]["train_loss"] == pytest.approx(b[-1]["train_loss"], rel=3e-2)
    assert a[-1]["val_mIoU"] == pytest.approx(b[-1]["val_mIoU"], abs=3.0)


# ---------------------------------------------------------------------------------------------
# Bad input


def _folder(root: Path, masks: list[np.ndarray], images=None, split="train") -> Path:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        h, w = mask.shape[:2]
        image = images[i] if images else np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / split / f"{i:03d}.jpg")
        Image.fromarray(mask).save(root / "annotations" / split / f"{i:03d}.png")
    return root


def _mask(value=1, shape=(40, 48)) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    m[10:20, 10:30] = value
    return m


@pytest.mark.parametrize(
    "case, message",
    [
        ("size", "is 48x40 but its image 000.jpg is 50x40"),
        ("labels", "has label value(s) [9] outside the 3 classes 0..2"),
        ("missing", "1 of 2 images in"),
        ("rgb", "is a RGB image; masks must hold one class index per pixel"),
        ("empty", "holds no images: the split is empty"),
        ("layout", "has no images/train/"),
    ],
)
def test_unusable_data_fails_with_one_line(case, message, tmp_path, capsys):
    root = tmp_path / "data"
    if case == "size":
        _folder(root, [_mask()], images=[np.zeros((40, 50, 3), dtype=np.uint8)])
    elif case == "labels":
        _folder(root, [_mask(1), _mask(9)])
    elif case == "missing":
        _folder(root, [_mask(), _mask()])
        (root / "annotations" / "train" / "001.png").unlink()
    elif case == "rgb":
        _folder(root, [np.stack([_mask()] * 3, -1)])
    elif case == "empty":
        _folder(root, [])
    else:
        root.mkdir()
    extra = ["--num-classes", "3"] if case == "labels" else []
    assert main(["segment", "train", "--data", str(root), "--out", str(tmp_path / "run"), *TRAIN, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_an_unreadable_image_is_skipped_and_counted(tmp_path, capsys):
    root = _folder(tmp_path / "data", [_mask(1), _mask(2), _mask(1), _mask(2)])
    (root / "images" / "train" / "002.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "run"
    assert main(["segment", "train", "--data", str(root), "--out", str(out), *TRAIN, "--epochs", "1"]) == 0
    assert "skipped 1 unreadable image(s), e.g." in capsys.readouterr().err
    assert rows_of(out)[0]["skipped_images"] == 1


def test_user_data_gets_settings_that_fit_it(tmp_path):
    from swinx.segmentation.train import fit_to_data, resolve_config

    masks = [_mask(i % 3, (200, 300)) for i in range(6)]
    root = _folder(tmp_path / "data", masks)
    train = D.SegmentationFolder(*D.find_split(root, "train"))
    cfg = resolve_config(None, dict(data=str(root), epochs=3))
    new, why = fit_to_data(cfg, {"data", "epochs"}, train)
    assert new.epochs == 3  # chosen: kept
    assert new.crop_size == "192" and new.base_size == 200 and new.hflip == 0.5 and new.img_size is None
    assert new.model_args["embed_dim"] == 32 and new.lr != cfg.lr
    assert "6 training images of median 200x300 px" in why and "3 classes" in why


def test_cat_max_ratio_redraws_crops_of_one_class():
    """mmsegmentation's cat_max_ratio: with 0.75, crops of a mostly-background mask hold more of the
    small object than plain random crops do, and never fewer than plain crops would on average."""
    mask = np.zeros((128, 128), dtype=np.int64)
    mask[10:40, 90:120] = 1  # 5.5% of the image
    image = tv_tensors.Image(torch.zeros(3, 128, 128, dtype=torch.uint8))
    shares = {}
    for ratio in (1.0, 0.75):
        crop = D.CatMaxRatioCrop((48, 48), ratio)
        torch.manual_seed(0)
        shares[ratio] = np.mean([(crop(image, tv_tensors.Mask(torch.from_numpy(mask)))[1] == 1).float().mean().item()
                                 for _ in range(200)])  # fmt: skip
    assert shares[0.75] > 2 * shares[1.0], shares


@pytest.mark.slow
def test_init_digits_pretrains_once_and_loads(tmp_path, monkeypatch):
    from swinx.segmentation import pretrain

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(pretrain, "PRETRAIN_EPOCHS", 1)
    monkeypatch.setattr(pretrain, "PRETRAIN_SIZE", 28)
    args = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
    path = pretrain.digit_backbone("swin_t", args, 4)
    assert path.is_file() and str(path).startswith(str(tmp_path))
    made = path.stat().st_mtime_ns
    assert pretrain.digit_backbone("swin_t", args, 4) == path and path.stat().st_mtime_ns == made  # cached
    assert pretrain.cache_path("swin_t", dict(args, embed_dim=32), 4) != path  # one file per architecture
    model = create_segmenter("upernet_swin_t", 11, channels=16, aux_channels=8, backbone_args=dict(args, window_size=4))
    report = swinx.load_checkpoint(model.backbone, path)
    assert sorted({k.split(".")[0] for k in report.fresh}) == ["norm0", "norm1", "norm2", "norm3"]
    assert "1 -> 3" in str(report)  # the gray patch embedding, repeated over RGB
