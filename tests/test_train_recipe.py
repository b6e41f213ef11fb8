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
