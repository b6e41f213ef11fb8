"""Training runs that survive interruption, DDP through torchrun, and fine-tuning with --init.

A resumed run must replay the uninterrupted one exactly: every epoch reseeds all RNGs from
(seed, epoch, rank), and the resume state holds model, optimizer, schedule, scaler and EMA.
So these tests keep all the randomness of the recipe on (RandAugment, random erasing,
MixUp/CutMix, drop path, EMA) and compare metrics and weights to 1e-6.

Everything runs on a tiny model (19k parameters) and tiny ImageFolder trees, with one
intra-op thread per process: on a small, busy machine two OpenMP threads per process make
an epoch about 50 times slower.
"""

from __future__ import annotations

import errno
import json
import math
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
from PIL import Image
from safetensors.torch import load_file

import swinx
import swinx.engine.rundir
import swinx.weights.checkpoint
from helpers import one_thread, randomize  # noqa: F401 - one_thread is used through pytestmark
from swinx.classification import data as D
from swinx.classification.recipe import resolve_config
from swinx.classification.train import build_model
from swinx.cli import main
from swinx.weights.checkpoint import read_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
MODEL_ARGS = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}
TINY = [
    "--model",
    "swin_t",
    "--model-args",
    json.dumps(MODEL_ARGS),
    "--img-size",
    "32",
    "--window-size",
    "4",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--progress",
    "off",
]
# Default augmentation, MixUp/CutMix and drop path stay on; EMA on; a short warm-up so the later
# epochs run on the cosine part of the schedule; a learning rate that actually moves the weights.
RANDOM = ["--ema-decay", "0.9", "--warmup-epochs", "2", "--lr", "0.2"]
# Everything random off, for comparing 2-process DDP with one process.
NO_AUGMENT = [
    "--auto-augment",
    "none",
    "--mixup",
    "0",
    "--cutmix",
    "0",
    "--reprob",
    "0",
    "--drop-path",
    "0",
    "--crop-scale",
    "1",
    "--hflip",
    "0",
]
TIMING = {"epoch_seconds", "images_per_second"}
CHECKPOINTS = ("last.safetensors", "best.safetensors")
FINAL_NAMES = {
    "config.yaml",
    "metrics.jsonl",
    "last.state.pt",
    "last.safetensors",
    "best.safetensors",
    "curves.png",
    "tensorboard",
}


# ---------------------------------------------------------------------------------------------
# Data, runs and comparisons


def make_tree(root: Path, train_per_class: int, val_per_class: int) -> Path:
    """Three colour-coded classes of 20x30 (W x H) noisy RGB images, train/ and val/."""
    colours = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, colour in enumerate(colours):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (30, 20, 3))
                pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def child_env() -> dict:
    src = str(Path(swinx.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=src + (os.pathsep + path if path else ""),
    )


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), *TINY, "--out", str(out), *extra]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def temp_files(run: Path) -> list[str]:
    """What atomic_write leaves when it is killed: `.<final name>.<random>.tmp` beside the final file."""
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


def assert_same_run(a: Path, b: Path, atol: float = 1e-6) -> None:
    """Every metric of every epoch (timings aside) and every checkpoint tensor agree."""
    rows_a, rows_b = rows_of(a), rows_of(b)
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    assert [r["epoch"] for r in rows_a] == list(range(1, len(rows_a) + 1))
    for ra, rb in zip(rows_a, rows_b):
        assert set(ra) == set(rb), (ra, rb)
        for key in set(ra) - TIMING:
            x, y = ra[key], rb[key]
            if isinstance(x, float) or isinstance(y, float):
                assert x is not None and y is not None and abs(x - y) <= atol, (ra["epoch"], key, x, y)
            else:
                assert x == y, (ra["epoch"], key, x, y)
    for name in CHECKPOINTS:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.allclose(ta[key], tb[key], atol=atol, rtol=0), (name, key, (ta[key] - tb[key]).abs().max())
        assert read_metadata(a / name)["epoch"] == read_metadata(b / name)["epoch"], name
    state_a = torch.load(a / "last.state.pt", weights_only=True)
    state_b = torch.load(b / "last.state.pt", weights_only=True)
    assert state_a["epoch"] == state_b["epoch"] and state_a["best"] == state_b["best"]
    assert (state_a["ema"] is None) == (state_b["ema"] is None)
    for key, tensor in (state_a["ema"] or {}).items():
        assert torch.allclose(tensor.float(), state_b["ema"][key].float(), atol=atol, rtol=0), ("ema", key)


def assert_checkpoints_whole(run: Path) -> dict:
    """Every file under a final name is complete and readable; returns the resume state."""
    for path in run.glob("*.safetensors"):
        model = swinx.load_model(path)
        assert model.class_names == ["class0", "class1", "class2"]
    state = torch.load(run / "last.state.pt", map_location="cpu", weights_only=True)
    assert state["format"] == swinx.engine.rundir.STATE_FORMAT and state["epoch"] >= 1
    rows = rows_of(run)  # every line parses
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    if (run / "curves.png").exists():
        with Image.open(run / "curves.png") as image:
            image.verify()
    # Anything that is not a final name is atomic_write's hidden temp file, never a half-written final file.
    for path in run.iterdir():
        assert path.name in FINAL_NAMES or (path.name.startswith(".") and path.name.endswith(".tmp")), path.name
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("small"), 12, 4)


@pytest.fixture(scope="module")
def reference4(small_data, tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run with all the randomness on, in this process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_cmd(small_data, out, *RANDOM, "--epochs", "4")) == 0
    rows = rows_of(out)
    assert len(rows) == 4 and len({r["train_loss"] for r in rows}) == 4
    return out


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_replays_the_uninterrupted_run(small_data, reference4, tmp_path):
    run = tmp_path / "run"
    assert main(train_cmd(small_data, run, *RANDOM, "--epochs", "2")) == 0
    assert len(rows_of(run)) == 2
    assert main(["train", "--resume", str(run), "--epochs", "4"]) == 0
    assert_same_run(reference4, run)
    assert read_metadata(run / "last.safetensors")["epoch"] == "4"
    # The weights really moved, so a broken resume (a fresh optimizer, say) cannot hide behind a frozen model.
    rows = rows_of(run)
    assert rows[0]["train_loss"] - rows[-1]["train_loss"] > 0.01


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupt_inside_the_weights_write_then_resume(
    small_data, reference4, tmp_path, monkeypatch, capsys, interrupt
):
    """Ctrl-C (or sys.exit) lands in epoch 3's save after the state file, halfway through writing the weights."""
    real_save_file = swinx.weights.checkpoint.save_file
    calls = []

    def save_file_then_interrupt(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        if metadata and metadata.get("epoch") == "3":
            calls.append(path)
            with open(path, "r+b") as f:  # half a file, as a kill in mid-write would leave it
                f.truncate(os.path.getsize(path) // 2)
            raise interrupt

    monkeypatch.setattr(swinx.weights.checkpoint, "save_file", save_file_then_interrupt)
    run = tmp_path / "run"
    if interrupt is KeyboardInterrupt:  # the CLI turns Ctrl-C into exit code 130 and says how to resume
        assert main(train_cmd(small_data, run, *RANDOM, "--epochs", "4")) == 130
        assert f"swinx train --resume {run}" in capsys.readouterr().err
    else:
        with pytest.raises(interrupt):
            main(train_cmd(small_data, run, *RANDOM, "--epochs", "4"))
    monkeypatch.undo()
    assert len(calls) == 1 and Path(calls[0]).parent == run and Path(calls[0]).name.startswith(".last.safetensors.")
    assert temp_files(run) == []
    state = assert_checkpoints_whole(run)
    assert state["epoch"] == 3 and len(rows_of(run)) == 3
    assert read_metadata(run / "last.safetensors")["epoch"] == "2"

    assert main(["train", "--resume", str(run), "--epochs", "4"]) == 0
    assert_same_run(reference4, run)


@pytest.mark.parametrize("failing", ["state", "weights"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(
    small_data, reference4, tmp_path, monkeypatch, capsys, failing
):
    """ENOSPC from inside atomic_write's temp-file write of epoch 2: exit 2, epoch 1 intact, no temp files."""
    run = tmp_path / "run"
    failures = []

    def full_disk(path):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # the part that fitted
        failures.append(Path(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "state":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer" in obj:
                full_disk(f)
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:
        real_save_file = swinx.weights.checkpoint.save_file

        def save(tensors, path, metadata=None):
            if metadata and metadata.get("epoch") == "2":
                full_disk(path)
            return real_save_file(tensors, path, metadata=metadata)

        monkeypatch.setattr(swinx.weights.checkpoint, "save_file", save)

    assert main(train_cmd(small_data, run, *RANDOM, "--epochs", "4")) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "No space left on device" in err and "epoch 2" in err, err
    assert len(failures) == 1 and failures[0].parent == run and failures[0].name.endswith(".tmp")
    assert temp_files(run) == []
    state = assert_checkpoints_whole(run)
    assert state["epoch"] == (1 if failing == "state" else 2)
    assert read_metadata(run / "last.safetensors")["epoch"] == "1"

    # Space freed: the run resumes and still equals the uninterrupted one.
    assert main(["train", "--resume", str(run), "--epochs", "4"]) == 0
    assert_same_run(reference4, run)


def kill_after_epochs(process: subprocess.Popen, run: Path, epochs: int, timeout: float = 120) -> None:
    """SIGKILL `process` as soon as metrics.jsonl holds `epochs` lines, i.e. inside that epoch's save."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, f"the run never finished epoch {epochs}"
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if len(lines) >= epochs:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """`kill -9` on a subprocess once epoch 2's metrics line is written (save_epoch writes it first)."""
    data = make_tree(tmp_path / "data", 150, 6)  # about a second an epoch
    env = child_env()
    cmd = [PYTHON, "-m", "swinx"]
    flags = [*RANDOM, "--epochs", "6"]
    run = tmp_path / "run"
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reference = subprocess.Popen(cmd + train_cmd(data, tmp_path / "reference", *flags), **popen)
    victim = subprocess.Popen(cmd + train_cmd(data, run, *flags), **popen)
    try:
        kill_after_epochs(victim, run, 2)

        state = assert_checkpoints_whole(run)
        rows = rows_of(run)
        weights_epoch = int(read_metadata(run / "last.safetensors")["epoch"])
        # save_epoch writes metrics, then the state, then the weights: adjacent epochs at worst.
        assert state["epoch"] in (len(rows), len(rows) - 1), (state["epoch"], len(rows))
        assert weights_epoch in (state["epoch"], state["epoch"] - 1), (weights_epoch, state["epoch"])
        for name in temp_files(run):  # a kill cannot clean up, but only ever leaves hidden temp files
            assert name.startswith(tuple(f".{final}." for final in FINAL_NAMES)), name

        resumed = subprocess.run(
            cmd + ["train", "--resume", str(run), "--epochs", "6"], env=env, capture_output=True, text=True, timeout=180
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"resuming {run} after epoch {state['epoch']}" in resumed.stdout
        out, _ = reference.communicate(timeout=180)
        assert reference.returncode == 0, out
    finally:
        for process in (victim, reference):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert_same_run(tmp_path / "reference", run)


# ---------------------------------------------------------------------------------------------
# DDP


def test_train_transform_without_augmentation_is_deterministic():
    """The precondition of the DDP comparison: with NO_AUGMENT the train transform draws nothing that matters."""
    transform = D.train_transform(
        32, D.IMAGENET_MEAN, D.IMAGENET_STD, crop_scale=1.0, hflip=0.0, auto_augment="none", reprob=0.0
    )
    for size in ((20, 30), (30, 20), (32, 32), (45, 30)):
        image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        outputs = []
        for seed in range(20):
            torch.manual_seed(seed)
            outputs.append(transform(image))
        assert all(torch.equal(o, outputs[0]) for o in outputs), size


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(small_data, tmp_path):
    env = child_env()
    flags = [*NO_AUGMENT, "--epochs", "3", "--lr", "0.2"]
    ddp_dir, single_dir = tmp_path / "ddp_cwd", tmp_path / "single_cwd"
    ddp_dir.mkdir()
    single_dir.mkdir()
    ddp_cmd = [
        TORCHRUN,
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "swinx",
        *train_cmd(small_data, Path("run"), *flags),
    ]
    ddp = subprocess.run(ddp_cmd, env=env, cwd=ddp_dir, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    single_cmd = [PYTHON, "-m", "swinx", *train_cmd(small_data, Path("run"), *flags)]
    single_cmd[single_cmd.index("--batch-size") + 1] = "8"
    single = subprocess.run(single_cmd, env=env, cwd=single_dir, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stdout + single.stderr

    assert "2 process(es)" in ddp.stdout and "global batch 8" in ddp.stdout and "global batch 8" in single.stdout
    assert ddp.stdout.count("epoch 3/3") == 1  # only rank 0 speaks
    assert sorted(os.listdir(ddp_dir)) == ["run"]  # only rank 0 wrote a run directory, and only the one asked for
    assert assert_checkpoints_whole(ddp_dir / "run")["epoch"] == 3 and temp_files(ddp_dir / "run") == []
    ddp_rows, single_rows = rows_of(ddp_dir / "run"), rows_of(single_dir / "run")
    assert len(ddp_rows) == len(single_rows) == 3
    for d, s in zip(ddp_rows, single_rows):
        assert d["ranks_in_sync"] is True and "ranks_in_sync" not in s
        for key in ("train_loss", "val_loss", "val_acc1", "val_acc5", "lr"):
            assert math.isclose(d[key], s[key], rel_tol=0, abs_tol=1e-4), (d["epoch"], key, d[key], s[key])
    assert ddp_rows[0]["train_loss"] - ddp_rows[-1]["train_loss"] > 0.01  # it learned something
    a, b = load_file(ddp_dir / "run" / "last.safetensors"), load_file(single_dir / "run" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=0), (key, (a[key] - b[key]).abs().max())


# ---------------------------------------------------------------------------------------------
# Fine-tuning from other layouts


def source_model() -> swinx.SwinTransformer:
    """A 10-class window-7 model at 56x56 (maps 14x14 and 7x7), every parameter random."""
    return randomize(swinx.create_model("swin_t", img_size=56, window_size=7, num_classes=10, **MODEL_ARGS), seed=3)


def save_layout(model: swinx.SwinTransformer, layout: str, path: Path) -> Path:
    state = swinx.export_state_dict(model, layout)
    torch.save({"model": state} if layout == "official" else state, path)
    return path


@pytest.mark.parametrize("layout", ["official", "timm", "torchvision"])
def test_init_from_another_layout(small_data, tmp_path, capsys, layout):
    source = source_model()
    checkpoint = save_layout(source, layout, tmp_path / f"{layout}.pth")
    run = tmp_path / "run"
    assert main(train_cmd(small_data, run, "--init", str(checkpoint), "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert f"initialised from {checkpoint}" in out and f"layout {layout}:" in out
    assert "head: replaced: the source has 10 classes, the model 3; new head initialised" in out
    for stage in (0, 1):
        assert f"layers.{stage}.blocks.0.attn.relative_position_bias_table window 7 -> 4" in out
    assert ("small_map set to 'pad'" in out) == (layout == "torchvision")

    # What --init loads, checked directly on the model train builds.
    config = resolve_config(None, {"data": str(small_data), "model_args": MODEL_ARGS, "img_size": 32, "window_size": 4})
    model = build_model(config, 3)
    fresh_head = model.head.weight.detach().clone()
    report = swinx.load_checkpoint(model, checkpoint)
    assert report.layout == layout and len(report.resized) == 2 and report.head.startswith("replaced")
    loaded, original = model.state_dict(), source.state_dict()
    for key in (
        "patch_embed.proj.weight",
        "patch_embed.norm.weight",
        "layers.0.blocks.0.attn.qkv.weight",
        "layers.0.blocks.0.mlp.fc2.weight",
        "layers.0.downsample.reduction.weight",
        "norm.bias",
    ):
        assert torch.equal(loaded[key], original[key]), key
    table = loaded["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (49, 1)
    assert torch.equal(model.head.weight, fresh_head) and model.head.weight.shape == (3, 32)

    # One epoch of warm-up at a tiny learning rate: the trained weights are still the source's.
    trained = swinx.load_model(run / "last.safetensors")
    assert trained.small_map == ("pad" if layout == "torchvision" else "clamp")
    weights = trained.state_dict()
    for key in ("patch_embed.proj.weight", "layers.0.blocks.0.attn.qkv.weight"):
        assert torch.allclose(weights[key], original[key], atol=1e-4, rtol=0), key
    assert torch.allclose(weights["layers.0.blocks.0.attn.relative_position_bias_table"], table, atol=1e-4, rtol=0)


def test_resume_of_a_torchvision_init_keeps_the_pad_rule(small_data, tmp_path):
    """--init from torchvision switches the model to the 'pad' small-map rule; a resumed run must keep it.

    At img 32 with window 7 the stage maps (8x8, 4x4) are smaller than a window, where 'pad'
    and 'clamp' compute different things.
    """
    checkpoint = save_layout(source_model(), "torchvision", tmp_path / "tv.pth")
    flags = ["--init", str(checkpoint), "--lr", "0.2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(train_cmd(small_data, whole, *flags, "--window-size", "7", "--epochs", "2")) == 0
    assert main(train_cmd(small_data, resumed, *flags, "--window-size", "7", "--epochs", "1")) == 0
    assert main(["train", "--resume", str(resumed), "--epochs", "2"]) == 0
    assert swinx.load_model(whole / "last.safetensors").small_map == "pad"
    assert swinx.load_model(resumed / "last.safetensors").small_map == "pad"
    assert_same_run(whole, resumed)
