"""Recipe switches that must not change the mathematics: gradient accumulation, gradient
checkpointing; and the ones that only have to run: bf16 autocast, the progress bar."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_train_cli import FAST, TINY, make_tree

from helpers import one_thread  # noqa: F401 - a fixture, used through pytestmark
from swinx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
# Deterministic training transform and no dropout: two runs differ only in how they compute.
PLAIN = [*FAST, "--crop-scale", "1", "--hflip", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 8 + 8 + 8 = 24 training images: three batches of 8, or six of 4, none dropped.
    return make_tree(tmp_path_factory.mktemp("recipe"), train_per_class=8, val_per_class=3)


def run(data, out, *flags) -> tuple[list[dict], dict[str, torch.Tensor]]:
    argv = ["train", "--data", str(data), *TINY, "--epochs", "2", "--out", str(out), *flags]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(out / "last.safetensors")


def assert_same(a, b, atol):
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("train_loss", "val_loss", "val_acc1", "lr"):
            assert math.isclose(ra[key], rb[key], abs_tol=atol), (ra["epoch"], key, ra[key], rb[key])
    for key in weights_a:
        assert torch.allclose(weights_a[key], weights_b[key], atol=atol, rtol=0), key


def test_accumulating_two_batches_of_4_equals_one_batch_of_8(data, tmp_path):
    whole = run(data, tmp_path / "whole", *PLAIN, "--batch-size", "8")
    accumulated = run(data, tmp_path / "accum", *PLAIN, "--batch-size", "4", "--accum-steps", "2")
    assert_same(whole, accumulated, atol=1e-5)
    # and the weights did move: a broken step (no update at all) cannot pass as "equal"
    first = run(data, tmp_path / "short", *PLAIN, "--batch-size", "8", "--epochs", "1")
    assert not torch.allclose(first[1]["head.weight"], whole[1]["head.weight"])


def test_gradient_checkpointing_changes_nothing_but_memory(data, tmp_path):
    # drop path on: checkpointing must replay the same random drops in its recomputation
    plain = run(data, tmp_path / "plain", *FAST, "--drop-path", "0.3")
    checkpointed = run(data, tmp_path / "ckpt", *FAST, "--drop-path", "0.3", "--grad-checkpointing")
    assert_same(plain, checkpointed, atol=1e-6)


def test_bf16_autocast_trains(data, tmp_path):
    rows, weights = run(data, tmp_path / "bf16", *PLAIN, "--amp", "bf16")
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    assert all(w.dtype == torch.float32 for w in weights.values())  # autocast, not a bf16 model
    full = run(data, tmp_path / "fp32", *PLAIN, "--amp", "off")
    assert abs(rows[-1]["train_loss"] - full[0][-1]["train_loss"]) < 0.1  # close, not equal: bf16 rounds


def test_progress_bar_shows_loss_lr_and_throughput(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("swinx.engine.loop.PROGRESS_SECONDS", 0)  # redraw at every batch of this short run
    argv = ["train", "--data", str(data), *TINY, "--epochs", "1", "--out", str(tmp_path / "bar"), "--progress", "on"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "lr=" in err and "img_s=" in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# The MNIST preset's batch-wise crop and the presets' precision


def test_batch_resized_crop_boxes_follow_random_resized_crop():
    from swinx.classification.data import BatchResizedCrop

    torch.manual_seed(0)
    crop = BatchResizedCrop(28, (0.0,), (1.0,), scale=(0.7, 1.0))
    top, left, h, w = crop.boxes(4000, 28, 28).unbind(1)
    area = h * w / (28 * 28)
    assert (h >= 1).all() and (w >= 1).all() and (h <= 28).all() and (w <= 28).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert area.min() >= 0.6 and area.max() <= 1.0  # 0.7-1.0 of the area, up to rounding of the sides
    aspect = w / h
    assert aspect.min() >= 0.7 and aspect.max() <= 1.4 and aspect.std() > 0.05
    assert top.float().std() > 0.5 and left.float().std() > 0.5  # placed at random, not centred
    # a box that can never fit (areas above the image): the centre crop of the whole image
    never = BatchResizedCrop(28, (0.0,), (1.0,), scale=(1.5, 2.0)).boxes(5, 28, 28)
    assert never.tolist() == [[0.0, 0.0, 28.0, 28.0]] * 5


def test_batch_resized_crop_matches_the_per_image_transform():
    from torchvision.transforms import InterpolationMode, v2

    from swinx.classification.data import MNIST_MEAN, MNIST_STD, BatchResizedCrop

    torch.manual_seed(0)
    images = (torch.rand(16, 1, 28, 28) * 255).round().to(torch.uint8)
    # the whole image: the identity, exactly (bicubic weights at the pixel centres are 0, 1, 0, 0)
    whole = BatchResizedCrop(28, MNIST_MEAN, MNIST_STD, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    expected = (images.float() / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    torch.testing.assert_close(whole(images), expected, rtol=0, atol=1e-5)
    # random boxes: close to torchvision's resized_crop of the same boxes (PIL's bicubic, a = -0.5)
    crop = BatchResizedCrop(28, (0.0,), (1.0,), scale=(0.7, 1.0))
    torch.manual_seed(1)
    boxes = crop.boxes(16, 28, 28).long().tolist()
    torch.manual_seed(1)
    ours = crop(images)
    theirs = torch.stack(
        [
            v2.functional.resized_crop(
                image.float() / 255, *box, [28, 28], InterpolationMode.BICUBIC, antialias=True
            ).clamp(0, 1)
            for image, box in zip(images, boxes)
        ]
    )
    difference = (ours - theirs).abs()
    assert ours.shape == (16, 1, 28, 28) and ours.min() >= 0 and ours.max() <= 1
    assert difference.mean() < 0.02 and difference.max() < 0.35


def test_mnist_preset_crops_whole_batches_and_trains_in_the_presets_precision(monkeypatch):
    from swinx.classification import recipe
    from swinx.classification.data import BatchResizedCrop
    from swinx.classification.train import build_data
    from swinx.engine import config

    data = build_data(recipe.resolve_config())
    assert isinstance(data.batch_transform, BatchResizedCrop) and data.train.transform is None
    assert data.val.transform is not None  # validation keeps the per-image resize
    image, label = data.train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    batch = data.batch_transform(torch.stack([image, image]))
    assert batch.dtype == torch.float32 and batch.shape == (2, 1, 28, 28)
    # any other augmentation: per-image transforms as before
    other = build_data(recipe.resolve_config(overrides={"hflip": 0.5}))
    assert other.batch_transform is None and other.train.transform is not None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    assert config.preset_amp() == "bf16" and recipe.resolve_config().amp == "bf16"
    assert recipe.resolve_config(overrides={"amp": "off"}).amp == "off"  # a flag still wins
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    assert config.preset_amp() == "auto" and recipe.resolve_config().amp == "auto"
