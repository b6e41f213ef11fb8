"""Fine-tuning options of `swinx train`: layer-wise learning-rate decay (SimMIM's rule for Swin),
a learning rate of the head's own, frozen stages and linear probing.

A tiny three-stage Swin (depths 2, 2, 2: L = 6 blocks, layer ids 0..7) on a tiny ImageFolder tree.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_cli import FAST, make_tree

import swinx
from helpers import one_thread, randomize  # noqa: F401 - one_thread is used through pytestmark
from swinx.classification.recipe import TrainConfig, TrainError, param_groups
from swinx.classification.train import ClassificationTask, train
from swinx.cli import main
from swinx.engine.config import finetune_param_groups, layer_ids, swin_layer_id
from swinx.engine.loop import Dist, Engine

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTHS = (2, 2, 2)
MODEL_ARGS = {"embed_dim": 16, "depths": list(DEPTHS), "num_heads": [1, 2, 4]}
SETTINGS = dict(model_args=MODEL_ARGS, img_size=32, window_size=4, batch_size=8, workers=0, progress="off")
SETTINGS.update(device="cpu", mixup=0.0, cutmix=0.0, auto_augment="none", reprob=0.0)
FLAGS = ["--model-args", json.dumps(MODEL_ARGS), "--img-size", "32", "--window-size", "4", "--batch-size", "8"]
FLAGS += ["--workers", "0", "--progress", "off", "--device", "cpu", "--epochs", "2", *FAST]
LAST = sum(DEPTHS) + 1  # the id of the final norm and the head


def expected_layer(name: str) -> int:
    """The layer id of a parameter, worked out here from its name alone (SimMIM's get_swin_layer)."""
    if name.startswith(("patch_embed.", "absolute_pos_embed")):
        return 0
    if m := re.fullmatch(r"layers\.(\d)\.blocks\.(\d)\..+", name):
        stage, block = int(m[1]), int(m[2])
        return 1 + 2 * stage + block  # two blocks per stage
    if m := re.fullmatch(r"layers\.(\d)\.downsample\..+", name):
        return 2 * (int(m[1]) + 1)  # the id of the stage's last block
    assert name.startswith(("norm.", "head.")), name
    return LAST


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    # 3 classes x 8 training images: three batches of 8 per epoch
    return make_tree(tmp_path_factory.mktemp("finetune"), train_per_class=8, val_per_class=2)


def make_engine(tree, model="swin_t", model_args=None, **settings) -> Engine:
    """What `train` builds before its first epoch: the task, AdamW over its groups, the schedule."""
    merged = {**SETTINGS, "epochs": 4, "warmup_epochs": 1, **settings}
    merged["model_args"] = {**MODEL_ARGS, **(model_args or {})}
    engine = Engine(ClassificationTask(TrainConfig(data=str(tree), model=model, **merged)), Dist(), torch.device("cpu"))
    engine.prepare()
    return engine


def group_of(engine: Engine) -> dict[str, dict]:
    """Each trainable parameter's optimizer group, by name (and each parameter in exactly one).
    A group's rate before the schedule's factor is its "initial_lr" (LambdaLR already applied step 0's)."""
    where = {id(p): g for g in engine.optimizer.param_groups for p in g["params"]}
    assert len(where) == sum(len(g["params"]) for g in engine.optimizer.param_groups)
    names = {name: where[id(p)] for name, p in engine.model.named_parameters() if id(p) in where}
    assert len(names) == len(where)
    return names


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay and the head's rate


def test_layer_ids_follow_simmim():
    model = swinx.create_model(
        "swin_t", **{**MODEL_ARGS, "depths": DEPTHS}, window_size=4, img_size=32, num_classes=5, ape=True
    )
    ids = layer_ids(model)
    assert ids == {name: expected_layer(name) for name, _ in model.named_parameters()}
    # spelled out for depths (2, 2, 2)
    assert ids["absolute_pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["layers.0.blocks.0.attn.qkv.weight"] == 1 and ids["layers.0.blocks.1.mlp.fc2.bias"] == 2
    assert ids["layers.0.downsample.reduction.weight"] == 2 and ids["layers.1.blocks.0.norm1.weight"] == 3
    assert ids["layers.1.downsample.norm.weight"] == 4 and ids["layers.2.blocks.1.attn.proj.weight"] == 6
    assert ids["norm.weight"] == ids["head.weight"] == 7
    assert swin_layer_id("norm2.weight", DEPTHS) == 7  # a backbone's output norm: top, like the final norm


@pytest.mark.parametrize("model, extra", [("swin_t", {"ape": True}), ("swinv2_t", {})])
def test_layer_decay_gives_every_parameter_its_layers_rate(tree, model, extra):
    decay = 0.7
    engine = make_engine(tree, model, extra, layer_decay=decay)
    base = engine.lr
    assert base == pytest.approx(5e-4 * 8 / 512)
    groups = group_of(engine)
    assert len(groups) == len(list(engine.model.parameters()))  # nothing frozen: every parameter trains
    names = set(groups)
    if model == "swinv2_t":
        assert any("cpb_mlp" in n for n in names) and any("logit_scale" in n for n in names)
    else:
        assert "absolute_pos_embed" in names
    # weight decay exactly as the plain groups give it
    plain_decay, plain_spared = ({id(p) for p in g["params"]} for g in param_groups(engine.model, 0.05))
    for name, p in engine.model.named_parameters():
        g = groups[name]
        assert g["initial_lr"] == pytest.approx(base * decay ** (LAST - expected_layer(name)), rel=1e-12), name
        assert g["weight_decay"] == (0.05 if id(p) in plain_decay else 0.0), name
        assert id(p) in plain_decay or id(p) in plain_spared
    # one group per (layer, decay or not), the first at the base rate (the one the engine logs)
    assert len(engine.optimizer.param_groups) == len(
        {(expected_layer(n), g["weight_decay"]) for n, g in groups.items()}
    )
    assert engine.optimizer.param_groups[0]["initial_lr"] == pytest.approx(base, rel=1e-12)
    assert min(g["initial_lr"] for g in engine.optimizer.param_groups) == pytest.approx(base * decay**LAST)

    # warm-up then cosine scale every group alike
    initial = [g["initial_lr"] for g in engine.optimizer.param_groups]
    factor = engine.task.lr_lambda(base, engine.steps_per_epoch)
    assert engine.steps_per_epoch == 3  # 1 warm-up epoch of 3 steps, 12 steps in all
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(base * factor(0), rel=1e-9)
    for step in range(1, 8):
        engine.optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        engine.schedule.step()
        now = [g["lr"] for g in engine.optimizer.param_groups]
        assert now[0] == pytest.approx(base * factor(step), rel=1e-9)
        for before, after in zip(initial, now):
            assert after / now[0] == pytest.approx(before / initial[0], rel=1e-9)
    assert factor(7) < factor(3) == pytest.approx(1.0)  # the last steps ran on the cosine


def test_head_lr_is_scaled_like_lr(tree):
    engine = make_engine(tree, head_lr=0.02, layer_decay=0.5)
    scale = 8 / 512
    groups = group_of(engine)
    for name, g in groups.items():
        if name.startswith("head."):
            assert g["initial_lr"] == pytest.approx(0.02 * scale, rel=1e-12), name
        else:
            assert g["initial_lr"] == pytest.approx(engine.lr * 0.5 ** (LAST - expected_layer(name)), rel=1e-12), name
    first = engine.optimizer.param_groups[0]["initial_lr"]
    assert groups["norm.weight"]["initial_lr"] == pytest.approx(engine.lr) == first
    assert groups["head.weight"]["weight_decay"] == 0.05 and groups["head.bias"]["weight_decay"] == 0.0
    # a head rate alone: every other parameter at the base rate
    groups = group_of(make_engine(tree, head_lr=0.02))
    rates = {n: g["initial_lr"] for n, g in groups.items()}
    assert all(r == pytest.approx(engine.lr) for n, r in rates.items() if not n.startswith("head.")), rates
    assert rates["head.bias"] == pytest.approx(0.02 * scale)


def test_without_finetuning_options_the_groups_are_the_plain_ones():
    model = swinx.create_model("swinv2_t", **MODEL_ARGS, window_size=4, img_size=32, num_classes=5)
    plain = param_groups(model, 0.05)
    same = finetune_param_groups(model, 0.05, 1e-3, layer_decay=1.0, head_lr=None)
    assert [(g.keys(), [id(p) for p in g["params"]]) for g in same] == [
        (g.keys(), [id(p) for p in g["params"]]) for g in plain
    ]
    assert "lr" not in same[0]  # AdamW's own rate: the engine's base rate


# ---------------------------------------------------------------------------------------------
# Frozen stages and linear probing, through real (short) runs


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Initial weights for --init (randomised, with an absolute position embedding): (path, tensors)."""
    model = randomize(swinx.create_model("swin_t", **MODEL_ARGS, window_size=4, img_size=32, num_classes=3, ape=True))
    path = tmp_path_factory.mktemp("init") / "start.safetensors"
    swinx.save_model(model, path)
    return path, load_file(path)


def frozen_and_changed(before: dict, after: dict) -> tuple[set[str], set[str]]:
    assert before.keys() == after.keys()
    same = {k for k in before if torch.equal(before[k], after[k])}
    return same, set(before) - same


def test_freeze_stages_keeps_patch_embedding_and_stage_1_bit_identical(tree, start, tmp_path, capsys):
    init, before = start
    out = tmp_path / "frozen"
    argv = ["train", "--data", str(tree), *FLAGS, "--model-args", json.dumps({**MODEL_ARGS, "ape": True})]
    argv += ["--init", str(init), "--freeze-stages", "1", "--drop-path", "0.2", "--out", str(out)]
    assert main(argv) == 0
    same, changed = frozen_and_changed(before, load_file(out / "last.safetensors"))
    frozen = {k for k in before if k.startswith(("patch_embed.", "absolute_pos_embed", "layers.0."))}
    assert "layers.0.downsample.reduction.weight" in frozen and "absolute_pos_embed" in frozen
    assert frozen <= same, sorted(frozen - same)
    assert "layers.1.blocks.0.mlp.fc1.weight" in changed and "head.weight" in changed
    assert all(k.startswith(("layers.1.", "layers.2.", "norm.", "head.")) for k in changed)
    assert yaml.safe_load((out / "config.yaml").read_text())["freeze_stages"] == 1
    logged = capsys.readouterr()
    assert "patch embedding and stage 1 frozen (" in logged.out + logged.err
    assert "parameters trainable)" in logged.out + logged.err


def test_frozen_parts_stay_in_eval_mode(tree):
    engine = make_engine(tree, freeze_stages=2, drop_path=0.5, ema_decay=0.9)
    model = engine.model
    for net in (model, engine.ema.module):
        net.eval()
        net.train()
        frozen = [net.patch_embed, net.pos_drop, net.layers[0], net.layers[1]]
        assert not any(m.training for part in frozen for m in part.modules())
        assert all(m.training for m in net.layers[2].modules()) and net.head.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("layers.2.", "norm.", "head."))}
    assert {id(p) for g in engine.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    line = engine.task.describe(engine)
    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"patch embedding and stages 1-2 frozen ({count:,} of {total:,} parameters trainable)" in line


def test_linear_probe_changes_only_the_head(tree, start, tmp_path, capsys):
    init, before = start
    out = tmp_path / "probe"
    settings = {**SETTINGS, **dict(epochs=2, warmup_epochs=0, lr=0.3, drop_path=0.3, label_smoothing=0.0)}
    settings.update(model_args={**MODEL_ARGS, "ape": True}, data=str(tree), init=str(init), out=str(out))
    settings.update(linear_probe=True, layer_decay=0.8)
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert main(["train", "--config", str(config)]) == 0
    same, changed = frozen_and_changed(before, load_file(out / "last.safetensors"))
    assert changed == {"head.weight", "head.bias"}
    logged = capsys.readouterr()
    assert "linear probe, all but the head frozen (" in logged.out + logged.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in rows)


def test_linear_probe_runs_the_trunk_in_eval_mode(tree):
    engine = make_engine(tree, linear_probe=True, drop_path=0.5)
    engine.net.train()
    model = engine.model
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert not any(m.training for name, m in model.named_modules() if name and not name.startswith("head"))
    assert model.head.training
    with torch.no_grad():  # no stochastic depth: the features are the same twice in train mode
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model.forward_features(x), model.forward_features(x))


def test_resume_keeps_the_finetuning_groups(tree, start, tmp_path):
    """Interrupted after epoch 2 of 3 and resumed: the same weights as the run straight through."""
    init, before = start
    argv = ["train", "--data", str(tree), *FLAGS, "--model-args", json.dumps({**MODEL_ARGS, "ape": True})]
    argv += ["--init", str(init), "--warmup-epochs", "2", "--drop-path", "0.1"]
    argv += ["--layer-decay", "0.8", "--head-lr", "0.5", "--freeze-stages", "1"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*argv, "--epochs", "3", "--out", str(whole)]) == 0
    assert main([*argv, "--epochs", "2", "--out", str(resumed)]) == 0
    assert main(["train", "--resume", str(resumed), "--epochs", "3"]) == 0
    a, b = load_file(whole / "last.safetensors"), load_file(resumed / "last.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    same, _ = frozen_and_changed(before, b)
    assert {k for k in before if k.startswith(("patch_embed.", "absolute_pos_embed", "layers.0."))} <= same
    groups_a, groups_b = (torch.load(r / "last.state.pt")["optimizer"]["param_groups"] for r in (whole, resumed))
    assert [g["name"] for g in groups_a] == [g["name"] for g in groups_b]
    assert [g["lr"] for g in groups_a] == pytest.approx([g["lr"] for g in groups_b], rel=1e-9)
    assert len({g["lr"] for g in groups_b}) > 3  # the per-layer rates survived the resume


# ---------------------------------------------------------------------------------------------
# Bad values


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ({"layer_decay": 0.0}, "layer_decay must be in (0, 1]"),
        ({"layer_decay": 1.5}, "layer_decay must be in (0, 1]"),
        ({"head_lr": 0.0}, "head_lr must be positive"),
        ({"freeze_stages": -1}, "freeze_stages must be 0"),
    ],
)
def test_bad_settings_are_clear_errors(setting, fragment):
    with pytest.raises(TrainError, match=re.escape(fragment)):
        TrainConfig(**setting)


def test_freezing_more_stages_than_the_model_has(tree, tmp_path, capsys):
    cfg = TrainConfig(data=str(tree), **{**SETTINGS, "epochs": 1}, freeze_stages=4, out=str(tmp_path / "a"))
    with pytest.raises(TrainError, match=re.escape("freeze_stages 4: swin_t has 3 stages; give 0")):
        train(cfg)
    argv = ["train", "--data", str(tree), *FLAGS, "--out", str(tmp_path / "b"), "--layer-decay", "1.5"]
    assert main(argv) == 2
    assert "layer_decay must be in (0, 1]" in capsys.readouterr().err
