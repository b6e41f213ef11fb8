"""Checkpoints: save/load of our own format, every container and layout, errors, heads, window resize,
the official fixture's exact export, atomic writes."""

from __future__ import annotations

import collections
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import swinx
from helpers import SMALL, randomize
from swinx import CheckpointError, export_state_dict, load_checkpoint, load_model, save_model
from swinx.weights.checkpoint import IMAGENET_22K_CLASSES, atomic_write, imagenet_22k_to_1k

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CASES = json.loads((FIXTURES / "cases.json").read_text())
VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])


def small(version: int = 1, seed: int = 0, randomized: bool = True, **overrides) -> swinx.SwinTransformer:
    name = "swin_t" if version == 1 else "swinv2_t"
    model = swinx.create_model(name, **{**SMALL, "num_classes": 7, **overrides})
    if randomized:
        randomize(model, seed)
    return model.eval()


def image(seed: int = 0, size=(64, 96)) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x=None) -> torch.Tensor:
    return model.eval()(image() if x is None else x)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----- 1. save_model / load_model ------------------------------------------------------------------
@VERSIONS
def test_save_load_model_round_trip(tmp_path, version):
    model = small(version, seed=1)
    names = [f"class {i}" for i in range(7)]
    path = tmp_path / "model.safetensors"
    save_model(model, path, class_names=names)

    loaded = load_model(path).eval()  # no variant given: the config comes from the metadata
    assert isinstance(loaded, swinx.SwinTransformer)
    assert loaded.config.version == version
    assert loaded.config == model.config
    assert loaded.class_names == names
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert torch.equal(logits(loaded), logits(model))

    # class names set on the model are saved when none are passed
    loaded.class_names = list("abcdefg")
    save_model(loaded, tmp_path / "again.safetensors")
    assert load_model(tmp_path / "again.safetensors").class_names == list("abcdefg")


def test_save_model_without_class_names(tmp_path):
    model = small(1)
    save_model(model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").class_names is None


@pytest.mark.parametrize("count", [6, 8, 0])
def test_save_model_wrong_number_of_class_names(tmp_path, count):
    with pytest.raises(ValueError, match="class names"):
        save_model(small(1, randomized=False), tmp_path / "m.safetensors", class_names=[str(i) for i in range(count)])
    assert not (tmp_path / "m.safetensors").exists()


def test_load_model_refuses_files_without_our_metadata(tmp_path):
    model = small(1)
    save_file(export_state_dict(model, "swinx"), tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no swinx config"):
        load_model(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent.safetensors")
    torch.save(model.state_dict(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(tmp_path / "model.pth")


# ----- 2. every container ----------------------------------------------------------------------------
def _write_pth_official(model, path):
    torch.save({"model": export_state_dict(model, "official"), "epoch": 3, "config": "x"}, path)


def _write_pt_plain(model, path):
    torch.save(model.state_dict(), path)


def _write_bin_hf(model, path):
    torch.save(export_state_dict(model, "hf"), path)


def _write_bin_legacy(model, path):
    torch.save(export_state_dict(model, "timm"), path, _use_new_zipfile_serialization=False)


def _write_safetensors(model, path):
    save_file(export_state_dict(model, "swinx"), path)


def _write_safetensors_torchvision(model, path):
    save_file(export_state_dict(model, "torchvision"), path)


CONTAINERS = {
    "model.pth": _write_pth_official,
    "model.pt": _write_pt_plain,
    "pytorch_model.bin": _write_bin_hf,
    "legacy.bin": _write_bin_legacy,
    "model.safetensors": _write_safetensors,
    "tv.safetensors": _write_safetensors_torchvision,
}


@VERSIONS
@pytest.mark.parametrize("filename", list(CONTAINERS))
def test_load_checkpoint_every_container(tmp_path, version, filename):
    source = small(version, seed=2)
    path = tmp_path / filename
    CONTAINERS[filename](source, path)
    target = small(version, seed=3)
    assert not torch.equal(logits(target), logits(source))
    report = load_checkpoint(target, path)
    assert report.loaded == len(target.state_dict())
    if filename.startswith("tv."):
        source.small_map = "pad"
    assert_same_state(target.state_dict(), source.state_dict())
    assert torch.equal(logits(target), logits(source))
    # str(path) works as well as a Path
    assert load_checkpoint(small(version, seed=4), str(path)).layout == report.layout


@VERSIONS
@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "module"])
def test_load_checkpoint_from_dict(version, wrapper):
    source = small(version, seed=5)
    state = source.state_dict()
    if wrapper == "module":  # DataParallel / DDP names
        state = {"module." + k: v for k, v in state.items()}
    elif wrapper is not None:
        state = {wrapper: state, "optimizer": {"lr": 0.1}}
    target = small(version, seed=6)
    load_checkpoint(target, state)
    assert torch.equal(logits(target), logits(source))


# ----- 3. every layout ---------------------------------------------------------------------------------
EXPECTED_DETECTION = {(2, "hf-hub"): "hf"}  # V2's hub names are the installed transformers' names


@VERSIONS
@pytest.mark.parametrize("layout", swinx.LAYOUTS)
def test_layout_round_trip(version, layout):
    source = small(version, seed=7)
    exported = export_state_dict(source, layout)
    assert all(isinstance(v, torch.Tensor) for v in exported.values())
    target = small(version, seed=8)
    report = load_checkpoint(target, exported, layout="auto")
    assert report.layout == EXPECTED_DETECTION.get((version, layout), layout)
    if layout == "torchvision":
        assert report.small_map == "pad" and target.small_map == "pad"
        assert all(b.small_map == "pad" for b in target.blocks())
        source.small_map = "pad"
    else:
        assert report.small_map is None and target.small_map == "clamp"
    if layout in ("official", "torchvision", "openmmlab"):
        assert report.ignored_buffers, "the persisted derived buffers should be reported as ignored"
        assert all(k.rsplit(".", 1)[-1] in swinx.weights.layouts.DERIVED_BUFFERS for k in report.ignored_buffers)
    else:
        assert report.ignored_buffers == []
    assert report.head == "loaded"
    assert_same_state(target.state_dict(), source.state_dict())
    assert torch.equal(logits(target), logits(source))
    # Naming the layout explicitly gives the same result.
    explicit = small(version, seed=9)
    assert load_checkpoint(explicit, exported, layout=layout).layout == layout
    assert_same_state(explicit.state_dict(), source.state_dict())


def test_unfold_order_is_nn_unfolds_channel_order():
    """OpenMMLab's patch merging reads the 2x2 neighbourhood through nn.Unfold(2, stride=2); ours concatenates
    [x(0,0), x(1,0), x(0,1), x(1,1)]. unfold_order maps one onto the other: unfolded[m] = ours[order[m]]."""
    from swinx.model.swin import PatchMerging
    from swinx.weights.layouts import unfold_order

    B, H, W, C = 2, 6, 8, 5
    x = torch.randn(B, H, W, C)
    merging = PatchMerging(C)
    torch.nn.init.eye_(merging.reduction.weight)  # (2C, 4C): the first 2C concatenated channels come out
    captured = {}
    merging.norm.register_forward_hook(lambda module, args, out: captured.setdefault("ours", args[0]))
    merging(x)
    ours = captured["ours"]  # (B, H/2, W/2, 4C) in our order
    unfolded = torch.nn.Unfold(2, stride=2)(x.permute(0, 3, 1, 2))  # (B, 4C, H/2 * W/2), channel-major
    unfolded = unfolded.transpose(1, 2).reshape(B, H // 2, W // 2, 4 * C)
    order = unfold_order(4 * C)
    assert torch.equal(unfolded, ours[..., order])
    assert sorted(order.tolist()) == list(range(4 * C)) and not torch.equal(order, torch.arange(4 * C))


def test_detect_layout_swinx_vs_official():
    model = small(1)
    ours = model.state_dict()
    assert swinx.weights.layouts.detect_layout(ours) == "swinx"
    assert swinx.weights.layouts.detect_layout(ours, wrapped=True) == "official"
    assert swinx.weights.layouts.detect_layout(export_state_dict(model, "official")) == "official"
    assert load_checkpoint(small(1, seed=1), {"model": ours}).layout == "official"


# ----- 4. errors ---------------------------------------------------------------------------------------
def _load_fails(model, source, **kwargs) -> str:
    """load_checkpoint must raise CheckpointError and leave the model untouched; returns the message."""
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, source, **kwargs)
    assert_same_state(model.state_dict(), before)
    return str(info.value)


@VERSIONS
def test_error_other_variant(version):
    source = small(version, seed=1, embed_dim=48)
    target = small(version, seed=2)
    msg = _load_fails(target, source.state_dict())
    theirs, ours = source.state_dict(), target.state_dict()
    differing = [k for k in ours if theirs[k].shape != ours[k].shape]
    assert differing
    named = [
        k
        for k in differing
        if re.search(re.escape(k) + r"\W", msg)
        and str(tuple(theirs[k].shape)) in msg
        and str(tuple(ours[k].shape)) in msg
    ]
    assert named, f"no mismatched key with both shapes in: {msg}"
    assert "embed_dim 48" in msg and "embed_dim 32" in msg


def test_error_unexpected_key():
    source = small(1, seed=1)
    state = {**source.state_dict(), "layers.0.blocks.0.attn.extra_weight": torch.zeros(3)}
    msg = _load_fails(small(1, seed=2), state)
    assert "layers.0.blocks.0.attn.extra_weight" in msg and "not in the model" in msg


@VERSIONS
def test_error_missing_key(version):
    state = dict(small(version, seed=1).state_dict())
    del state["layers.1.blocks.1.mlp.fc1.weight"]
    msg = _load_fails(small(version, seed=2), state)
    assert "layers.1.blocks.1.mlp.fc1.weight" in msg and "missing" in msg


def test_error_missing_key_in_peer_layout():
    state = export_state_dict(small(2, seed=1), "hf")
    key = next(k for k in state if k.endswith("layers.2.blocks.0.attention.self.key.weight"))
    del state[key]
    msg = _load_fails(small(2, seed=2), state)
    assert key in msg


NOT_A_CHECKPOINT = r"not a (readable )?PyTorch checkpoint|not a .*checkpoint|neither a PyTorch checkpoint"


@pytest.mark.parametrize("name", ["notes.txt", "notes.pth", "notes.safetensors"])
def test_error_text_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("These are not weights.\n" * 20)
    msg = _load_fails(small(1), path)
    assert str(path) in msg
    assert re.search(NOT_A_CHECKPOINT, msg), msg


@pytest.mark.parametrize("name", ["noise.pth", "noise.pt", "noise.bin", "noise.safetensors", "noise"])
def test_error_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(random.Random(0).randbytes(4096))
    msg = _load_fails(small(1), path)
    assert str(path) in msg
    assert re.search(NOT_A_CHECKPOINT, msg), msg
    # Noise is a damaged file, not a pickle of forbidden objects: it must not be described as one.
    assert "Python objects" not in msg, msg


def test_error_truncated_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(small(1).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _load_fails(small(1), path)
    assert re.search(NOT_A_CHECKPOINT, msg), msg


def test_error_missing_path(tmp_path):
    msg = _load_fails(small(1), tmp_path / "nowhere" / "model.pth")
    assert "does not exist" in msg and "nowhere" in msg
    msg = _load_fails(small(1), tmp_path)  # a directory without a model in it
    assert "without a model" in msg


# Objects whose unpickling has a visible side effect: a marker file. The module-level hook keeps the
# side effect off while the test builds and saves them.
_MARKER: Path | None = None


def _touch_marker(path: str):
    Path(path).write_text("unpickled")
    return {}


class Gadget:
    """A pickle that runs code on load: __reduce__ names a function to call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch_marker, (str(self.marker),)


class MarkerDict(collections.OrderedDict):
    """An OrderedDict subclass whose constructor, run by the unpickler, leaves a marker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if _MARKER is not None:
            _MARKER.write_text("constructed")


def _gadget_checkpoint(kind: str, marker: Path, model) -> object:
    if kind == "reduce":
        return {"model": model.state_dict(), "extra": Gadget(marker)}
    if kind == "reduce-entry":
        return {**model.state_dict(), "evil": Gadget(marker)}
    return {"model": MarkerDict(model.state_dict())}


@pytest.mark.parametrize("kind", ["reduce", "reduce-entry", "dict-subclass"])
@pytest.mark.parametrize("name", ["model.pth", "model.bin"])
def test_error_pickled_objects_are_never_unpickled(tmp_path, kind, name):
    global _MARKER
    model = small(1)
    marker = tmp_path / "marker"
    path = tmp_path / name
    torch.save(_gadget_checkpoint(kind, marker, model), path)
    assert not marker.exists()
    _MARKER = marker
    try:
        msg = _load_fails(small(1, seed=1), path)
        assert not marker.exists(), "load_checkpoint ran code from the pickle"
        assert "Python objects" in msg or "not unpickled" in msg, msg
        # Control: a plain unpickle of the same file does run the code, so the check above means something.
        torch.load(path, weights_only=False)
        assert marker.exists()
    finally:
        _MARKER = None


@pytest.mark.parametrize("source", [{}, {"model": {}}, {"state_dict": {}}], ids=["empty", "model", "state_dict"])
def test_error_empty_dict(source):
    msg = _load_fails(small(1), source)
    assert "empty" in msg


def test_error_non_tensor_values():
    state = {**small(1).state_dict(), "epoch": 3}
    msg = _load_fails(small(1, seed=1), state)
    assert "epoch" in msg and "not tensors" in msg


def test_error_non_string_keys():
    state = {**small(1).state_dict(), 7: torch.zeros(1)}
    msg = _load_fails(small(1, seed=1), state)
    assert "7" in msg


def test_error_not_a_mapping():
    msg = _load_fails(small(1), [torch.zeros(1)])
    assert "list" in msg


def test_error_unknown_layout():
    msg = _load_fails(small(1), small(1, seed=1).state_dict(), layout="nonsense")
    assert "nonsense" in msg
    with pytest.raises(ValueError, match="nonsense"):
        export_state_dict(small(1), "nonsense")


def test_error_unrecognised_layout():
    state = {"encoder.conv.weight": torch.zeros(3, 3)}
    msg = _load_fails(small(1), state)
    assert "unrecognised checkpoint layout" in msg


def test_error_wrong_layout_named():
    state = export_state_dict(small(1, seed=1), "timm")
    msg = _load_fails(small(1), state, layout="torchvision")
    assert "missing" in msg and "features.0.0.weight" in msg


# ----- 5. heads ----------------------------------------------------------------------------------------
@VERSIONS
def test_head_of_other_class_count_is_replaced(version):
    source = small(version, seed=1)  # 7 classes
    target = small(version, seed=2, num_classes=11)
    own_head = snapshot(target.head)
    report = load_checkpoint(target, source.state_dict())
    assert "replaced" in report.head
    assert_same_state(target.head.state_dict(), own_head)
    x = image()
    with torch.no_grad():
        assert torch.equal(target.forward_features(x), source.forward_features(x))
    assert logits(target).shape == (2, 11)


def test_imagenet_22k_map():
    index = imagenet_22k_to_1k()
    assert index.shape == (1000,)
    assert index.dtype == torch.int64
    assert int(index.min()) >= 0 and int(index.max()) < IMAGENET_22K_CLASSES == 21841
    assert index.unique().numel() == 1000


def test_head_22k_remapped_to_1k():
    source = small(1, seed=1, num_classes=IMAGENET_22K_CLASSES)
    target = small(1, seed=2, num_classes=1000)
    report = load_checkpoint(target, export_state_dict(source, "timm"))
    assert "remapped" in report.head
    index = imagenet_22k_to_1k()
    weight, bias = source.head.weight.detach(), source.head.bias.detach()
    for i in (0, 1, 17, 500, 998, 999):
        assert torch.equal(target.head.weight[i], weight[index[i]])
        assert torch.equal(target.head.bias[i], bias[index[i]])
    assert torch.equal(target.head.weight, weight[index]) and torch.equal(target.head.bias, bias[index])
    assert torch.equal(logits(target), logits(source)[:, index])


@VERSIONS
@pytest.mark.parametrize("layout", ["swinx", "timm", "hf", "openmmlab"])
def test_head_dropped_by_headless_model(version, layout):
    source = small(version, seed=1)
    target = small(version, seed=2, num_classes=0)
    report = load_checkpoint(target, export_state_dict(source, layout))
    assert "dropped" in report.head
    x = image()
    with torch.no_grad():
        pooled = target(x)
        assert pooled.shape == (2, target.num_features)
        assert torch.equal(pooled, source.forward_head(source.forward_features(x), pre_logits=True))


@VERSIONS
@pytest.mark.parametrize("layout", ["swinx", "official", "timm", "torchvision", "hf", "openmmlab"])
def test_backbone_only_checkpoint_keeps_head(version, layout):
    source = small(version, seed=1)
    state = export_state_dict(source, layout)
    head_keys = [k for k in state if k.startswith(("head.", "classifier."))]
    assert head_keys
    for k in head_keys:
        del state[k]
    target = small(version, seed=2)
    own_head = snapshot(target.head)
    report = load_checkpoint(target, state)
    assert "kept" in report.head
    assert_same_state(target.head.state_dict(), own_head)
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert_same_state({k: v for k, v in target.state_dict().items() if not k.startswith("head.")}, backbone)


# ----- 6. window resize ---------------------------------------------------------------------------------
def _bicubic(table: torch.Tensor, old: int, new: int) -> torch.Tensor:
    heads = table.shape[1]
    grid = table.t().reshape(1, heads, 2 * old - 1, 2 * old - 1)
    grid = F.interpolate(grid, size=(2 * new - 1, 2 * new - 1), mode="bicubic", align_corners=False)
    return grid.reshape(heads, (2 * new - 1) ** 2).t()


TABLE = "relative_position_bias_table"


def test_window_resize_v1():
    source = small(1, seed=1)  # window 7
    target = small(1, seed=2, window_size=12)
    report = load_checkpoint(target, source.state_dict())
    tables = [k for k in target.state_dict() if k.endswith(TABLE)]
    assert report.resized and len([r for r in report.resized if TABLE in r]) == len(tables) == 8
    assert "7 -> 12" in report.resized[0]
    theirs, ours = source.state_dict(), target.state_dict()
    for key in tables:
        heads = theirs[key].shape[1]
        assert ours[key].shape == ((2 * 12 - 1) ** 2, heads)
        expected = _bicubic(theirs[key], 7, 12)
        assert torch.allclose(ours[key], expected, atol=1e-6, rtol=0), key
        # The table centre (offset 0, 0) falls on the same point of both grids.
        assert torch.allclose(ours[key][(2 * 12 - 1) ** 2 // 2], theirs[key][13**2 // 2], atol=1e-6)
    for key in ours:
        if not key.endswith(TABLE):
            assert torch.equal(ours[key], theirs[key]), key
    assert torch.isfinite(logits(target)).all()


def test_window_resize_constant_table():
    source = small(1, seed=1)
    with torch.no_grad():
        for block in source.blocks():
            block.attn.relative_position_bias_table.fill_(0.375)
    target = small(1, seed=2, window_size=12)
    assert load_checkpoint(target, source.state_dict()).resized
    for block in target.blocks():
        table = block.attn.relative_position_bias_table
        assert table.shape[0] == 23**2
        assert torch.allclose(table, torch.full_like(table, 0.375), atol=1e-6, rtol=0)


def test_window_resize_down_and_same():
    source = small(1, seed=1, window_size=12)
    target = small(1, seed=2, window_size=5)
    report = load_checkpoint(target, source.state_dict())
    key = "layers.2.blocks.1.attn." + TABLE
    assert target.state_dict()[key].shape == (81, 4)
    assert torch.allclose(target.state_dict()[key], _bicubic(source.state_dict()[key], 12, 5), atol=1e-6, rtol=0)
    assert report.resized
    assert load_checkpoint(small(1, seed=3), small(1, seed=4).state_dict()).resized == []


# ----- 7. official fixture: exact export ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_official_fixture_export_is_exact(case):
    io = torch.load(FIXTURES / f"{case}.io.pt", weights_only=True)
    official = torch.load(FIXTURES / f"{case}.pth", weights_only=True)["model"]
    config = swinx.SwinConfig(version=2 if io["kind"] == "v2" else 1, **io["config"])
    model = swinx.SwinTransformer(config).eval()
    report = load_checkpoint(model, FIXTURES / f"{case}.pth")
    assert report.layout == "official"
    buffers = {k for k in official if k.rsplit(".", 1)[-1] in swinx.weights.layouts.DERIVED_BUFFERS}
    assert any(k.endswith("relative_position_index") for k in buffers)
    assert any(k.endswith("attn_mask") for k in buffers)
    assert (io["kind"] == "v2") == any(k.endswith("relative_coords_table") for k in buffers)
    assert set(report.ignored_buffers) == buffers

    exported = export_state_dict(model, "official")
    assert sorted(exported) == sorted(official)
    for key, expected in official.items():
        got = exported[key]
        assert got.shape == expected.shape, (key, got.shape, expected.shape)
        assert got.dtype == expected.dtype, (key, got.dtype, expected.dtype)
        assert torch.equal(got, expected), key
    with torch.no_grad():
        assert torch.allclose(model(io["input"]), io["logits"], atol=1e-4, rtol=0)


# ----- 8. atomic writes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_old_file(tmp_path, error):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old content")

    def write(tmp):
        assert Path(tmp).parent == tmp_path
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise error("disk full")

    with pytest.raises(error):
        atomic_write(path, write)
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_atomic_write_replaces_and_creates_directories(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"one"))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"two"))
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["out.bin"]


def test_save_model_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_model(small(1, seed=1), path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(swinx.weights.checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        save_model(small(1, seed=2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_save_model_over_existing_file(tmp_path):
    path = tmp_path / "model.safetensors"
    first, second = small(1, seed=1), small(2, seed=2)
    save_model(first, path, class_names=list("abcdefg"))
    save_model(second, path)
    loaded = load_model(path).eval()
    assert loaded.config.version == 2 and loaded.class_names is None
    assert torch.equal(logits(loaded), logits(second))
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_save_model_file_permissions_follow_umask(tmp_path):
    """The saved model is as readable as any file the user creates (open() honours the umask)."""
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    path = tmp_path / "model.safetensors"
    save_model(small(1), path)
    assert oct(path.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)


@pytest.mark.parametrize("version", [1, 2])
def test_gray_weights_load_into_a_colour_model_and_back(version):
    """A 1-channel patch embedding repeated over 3 channels (/3): a gray image repeated as RGB gives the
    same outputs (an MNIST `swinx train` run initialising a detector on RGB images); summed back for gray."""
    gray = small(version, in_chans=1).eval()
    colour = small(version, seed=1, in_chans=3).eval()
    report = load_checkpoint(colour, gray.state_dict())
    assert any("input channels 1 -> 3" in r for r in report.resized), report
    x = image()[:, :1]
    with torch.no_grad():
        assert torch.allclose(colour(x.repeat(1, 3, 1, 1)), gray(x), atol=1e-5)
    back = small(version, seed=2, in_chans=1).eval()
    load_checkpoint(back, colour.state_dict())
    with torch.no_grad():
        assert torch.allclose(back(x), gray(x), atol=1e-5)
