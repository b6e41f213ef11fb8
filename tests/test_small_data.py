"""A newcomer's `swinx train --data DIR`: a small folder gets a fitting preset, said out loud with an
estimate of the run time; a user's choices are kept; the ImageNet recipe stays for large data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import one_thread  # noqa: F401 - a fixture, used through pytestmark
from swinx.classification import recipe as R
from swinx.cli import main
from swinx.engine.config import default_workers

pytestmark = pytest.mark.usefixtures("one_thread")


def make_folder(root: Path, size=(32, 32), mode="RGB", per_class=6, classes=3) -> Path:
    rng = random.Random(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shade = 60 + 60 * c + rng.randint(-20, 20)
                colour = shade if mode == "L" else (shade, 255 - shade, rng.randint(0, 255))
                Image.new(mode, size, colour).save(folder / f"{i}.png")
    return root


def summary(images=1800, short=32, long=32, gray=False) -> R.DataSummary:
    return R.DataSummary(images, 10, short, long, gray, (0.5,) if gray else (0.5,) * 3, (0.25,) if gray else (0.2,) * 3)


def test_summary_reads_sides_colour_and_statistics(tmp_path):
    colour = R.summarise(sorted(str(p) for p in make_folder(tmp_path / "c").rglob("train/*/*.png")), 3)
    assert (colour.images, colour.classes, colour.short, colour.long, colour.gray) == (18, 3, 32, 32, False)
    assert len(colour.mean) == 3 and all(0 < s for s in colour.std)
    gray = R.summarise(sorted(str(p) for p in make_folder(tmp_path / "g", (40, 24), "L").rglob("train/*/*.png")), 3)
    assert (gray.short, gray.long, gray.gray, len(gray.mean)) == (24, 40, True, 1)


def test_small_data_preset_fits_the_images():
    cfg = R.resolve_config(None, {"data": "somewhere"})
    assert cfg.model == "swin_t" and cfg.img_size == 224 and cfg.epochs == 300  # what a newcomer got before
    fitted, why = R.fit_to_data(cfg, {"data"}, summary())
    assert (fitted.img_size, fitted.in_chans, fitted.window_size, fitted.batch_size) == (32, 3, 4, 32)
    assert fitted.model_args["patch_size"] == 2 and fitted.mean == (0.5,) * 3
    assert 10 <= fitted.epochs <= 60
    assert fitted.epochs * 1800 * 32 * 32 <= R.PRESET_BUDGET  # about the MNIST preset's compute, no more
    assert "small-data preset" in why and "1,800 training images of median 32x32" in why and "hours" in why
    gray, _ = R.fit_to_data(cfg, {"data"}, summary(images=600, short=28, long=28, gray=True))
    assert (gray.in_chans, gray.img_size, gray.window_size, len(gray.mean)) == (1, 32, 4, 1)
    photos, _ = R.fit_to_data(cfg, {"data"}, summary(images=3000, short=300, long=400))
    assert (photos.img_size, photos.model_args["patch_size"], photos.window_size) == (96, 4, 6)
    assert gray.epochs == 60  # few images: capped


def test_the_users_choices_are_kept():
    cfg = R.resolve_config(None, {"data": "d", "epochs": 7, "lr": 1e-3})
    fitted, why = R.fit_to_data(cfg, {"data", "epochs", "lr"}, summary())
    assert fitted.epochs == 7 and fitted.lr == 1e-3 and fitted.img_size == 32 and "kept yours: epochs, lr" in why
    cfg = R.resolve_config(None, {"data": "d", "model": "swin_t"})
    same, why = R.fit_to_data(cfg, {"data", "model"}, summary())
    assert same == cfg and "the ones given (--model)" in why
    cfg = R.resolve_config(None, {"data": "d", "init": "microsoft/swin-tiny-patch4-window7-224"})
    same, why = R.fit_to_data(cfg, {"data", "init"}, summary())
    assert same == cfg and "--init" in why


def test_large_data_keeps_the_papers_recipe():
    cfg = R.resolve_config(None, {"data": "d"})
    same, why = R.fit_to_data(cfg, {"data"}, summary(images=R.SMALL_DATA_IMAGES + 1))
    assert same == cfg and "ImageNet recipe (swin_t at 224 px, 300 epochs)" in why


def test_workers_follow_the_machine():
    assert R.TrainConfig().workers == default_workers()
    assert R.TrainConfig(workers=3).workers == 3


def test_newcomer_run_says_what_it_picked_and_estimates(tmp_path, capsys):
    """End to end through the CLI: the preset line, an estimate before training, one after the first
    batches and one after the first epoch; config.yaml holds the fitted settings."""
    data = make_folder(tmp_path / "data")
    code = main(["train", "--data", str(data), "--epochs", "2", "--out", str(tmp_path / "run"), "--progress", "off"])
    captured = capsys.readouterr()
    log = captured.out + captured.err
    assert code == 0, log
    assert "picked the small-data preset" in log and "kept yours: epochs" in log
    assert "estimated before training:" in log and "from timing 3 training steps" in log
    assert "estimated training time:" in log and "estimated time left:" in log
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["img_size"] == 32 and saved["window_size"] == 4 and saved["epochs"] == 2 and saved["in_chans"] == 3
