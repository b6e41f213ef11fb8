"""Fast kernels are exact: ops.linear (oneDNN) against F.linear, fused model paths against plain PyTorch ops.

No test here times anything: the fast paths are checked only for giving the same numbers,
and for not breaking autograd, inference_mode or the caches in between.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import swinx
from helpers import SMALL, max_diff, one_thread, randomize  # noqa: F401 - one_thread is used through pytestmark
from swinx.model import ops
from swinx.model.swin import Mlp, SwinBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # two threads on two shared cores: see helpers

SHAPES = [(5, 24), (3, 7, 24), (2, 4, 49, 24)]  # 2-D, 3-D, 4-D inputs (the last: windows)


@pytest.fixture(autouse=True)
def onednn_in_training(monkeypatch):
    """Training takes OneDNNLinear only where oneDNN is timed faster than BLAS on this host; these
    tests check that path, so it is taken whatever this host's timing would say."""
    monkeypatch.setattr(ops, "_onednn_trains_faster", lambda x, weight: True)


MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def reference(x, weight, bias, gelu):
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y  # F.gelu defaults to the exact erf form


def operands(shape, out_features=40, bias=True, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(out_features, shape[-1], generator=g) / shape[-1] ** 0.5
    b = 0.5 * torch.randn(out_features, generator=g) if bias else None
    for t in (x, weight, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, weight, b


def assert_same_backward(out, ref, leaves, copies, seed=0):
    """Backpropagates one random weighting of `out` and `ref`: each leaf gets a nonzero gradient equal to its copy's."""
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for mine, theirs in zip(leaves, copies):
        if mine is not None:
            assert mine.grad is not None and mine.grad.abs().max() > 0
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def small_model(version: int = 1, **overrides) -> swinx.SwinTransformer:
    name = "swin_t" if version == 1 else "swinv2_t"
    return randomize(swinx.create_model(name, **{**SMALL, "num_classes": 7, "drop_path_rate": 0.0, **overrides}))


# ---------------------------------------------------------------------------------------------
# ops.linear


def test_onednn_kernel_is_available():
    # Not a requirement of the library (it falls back), but without it the tests below would
    # only compare F.linear with itself: say so instead of passing silently.
    if not ops.HAS_ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN linear; the fast path is never taken")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_fast_linear_matches_f_linear(mode, shape, bias, gelu):
    x, weight, b = operands(shape, bias=bias)
    with MODES[mode]():
        fast = ops.linear(x, weight, b, gelu=gelu, fast=True)
        plain = ops.linear(x, weight, b, gelu=gelu, fast=False)
        expected = reference(x, weight, b, gelu)
    assert fast.shape == expected.shape == (*shape[:-1], 40)
    assert fast.dtype == torch.float32
    assert torch.equal(plain, expected)  # fast=False is F.linear itself
    scale = expected.abs().max().item()
    assert scale > 0.5  # magnitudes are O(1): atol 1e-5 is a relative check
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_fast_linear_on_non_contiguous_input(mode):
    """Window attention hands ops.linear views; a transposed input must not be read as if contiguous."""
    x, weight, b = operands((2, 9, 24))
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major strides
    assert not x.is_contiguous()
    with MODES[mode]():
        for gelu in (False, True):
            torch.testing.assert_close(
                ops.linear(x, weight, b, gelu=gelu), reference(x, weight, b, gelu), rtol=1e-5, atol=1e-5
            )


def test_fast_linear_leaves_other_dtypes_to_f_linear():
    x, weight, b = operands((3, 7, 24))
    x, weight, b = x.double(), weight.double(), b.double()
    with torch.no_grad():
        assert torch.equal(ops.linear(x, weight, b, gelu=True), reference(x, weight, b, True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fast_linear_under_bfloat16_autocast(mode, gelu, bias):
    x, weight, b = operands((2, 4, 49, 24), bias=bias)
    with MODES[mode](), torch.autocast("cpu", torch.bfloat16):
        fast = ops.linear(x, weight, b, gelu=gelu)
        expected = reference(x, weight, b, gelu)
    assert expected.dtype == torch.bfloat16  # what autocast does to F.linear ...
    assert fast.dtype == torch.bfloat16  # ... ops.linear does too
    exact = reference(x, weight, b, gelu)  # float32, no autocast
    # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, inputs and output rounded
    torch.testing.assert_close(fast.float(), expected.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast.float(), exact, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_linear_with_autograd_records_a_graph_and_gradients_are_exact(shape, bias, gelu):
    x, weight, b = operands(shape, bias=bias, requires_grad=True)
    x2, weight2, b2 = operands(shape, bias=bias, requires_grad=True)
    y = ops.linear(x, weight, b, gelu=gelu)
    assert y.grad_fn is not None and y.requires_grad
    expected = reference(x2, weight2, b2, gelu)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    expected.backward(g)
    for mine, theirs in ((x, x2), (weight, weight2), (b, b2)):
        if mine is not None:
            assert mine.grad is not None
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def test_linear_with_grad_enabled_but_nothing_requiring_grad():
    """An eval forward without no_grad, all parameters frozen: no graph, same numbers."""
    x, weight, b = operands((3, 7, 24))
    assert torch.is_grad_enabled()
    y = ops.linear(x, weight, b, gelu=True)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, reference(x, weight, b, True), rtol=1e-5, atol=1e-5)


def test_linear_with_autograd_on_the_weight_only_or_the_input_only():
    for which in ("x", "weight"):
        x, weight, b = operands((3, 7, 24))
        leaf = x if which == "x" else weight
        leaf.requires_grad_(True)
        y = ops.linear(x, weight, b, gelu=True)
        assert y.grad_fn is not None
        y.sum().backward()
        x2, weight2, b2 = operands((3, 7, 24))
        leaf2 = x2 if which == "x" else weight2
        leaf2.requires_grad_(True)
        reference(x2, weight2, b2, True).sum().backward()
        torch.testing.assert_close(leaf.grad, leaf2.grad, rtol=1e-4, atol=1e-5)


def test_autocast_inference_sees_a_fused_optimizer_step():
    """Evaluation under autocast between training steps uses the updated weights. A fused AdamW step
    changes the parameters without bumping their version counters, so a cast kept across autocast
    regions and keyed by version would go stale (it did: the MNIST preset's validation stayed at its
    first epoch's accuracy)."""
    layer = torch.nn.Linear(24, 16)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    x = torch.randn(2, 49, 24)

    def evaluate(fn):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            return fn(x, layer.weight, layer.bias).float()

    before = evaluate(ops.linear)
    layer(x).square().sum().backward()
    version = layer.weight._version
    optimizer.step()
    assert layer.weight._version == version  # the reason a version key is not enough
    after = evaluate(ops.linear)
    torch.testing.assert_close(after, evaluate(F.linear), rtol=2e-2, atol=2e-2)
    assert not torch.allclose(after, before, atol=1e-2)


def test_linear_with_autograd_under_bfloat16_autocast():
    x, weight, b = operands((2, 9, 24), requires_grad=True)
    x2, weight2, b2 = operands((2, 9, 24), requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = ops.linear(x, weight, b, gelu=True)
        expected = reference(x2, weight2, b2, True)
    assert y.dtype == expected.dtype == torch.bfloat16 and y.grad_fn is not None
    # training under autocast is autocast's own F.linear (oneDNN's bf16 matmul, native backward)
    assert "OneDNNLinear" not in str(y.grad_fn.next_functions)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.float().sum().backward()
    expected.float().sum().backward()
    assert weight.grad.dtype == torch.float32  # the float32 leaf gets a float32 gradient
    for mine, theirs in ((x, x2), (weight, weight2), (b, b2)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The whole model: fast paths (fused attention, oneDNN linear + GELU) against plain ops


def all_plain(monkeypatch, model):
    """set_fused_attn(False) turns the attention and the MLP to plain ops; patch merging calls
    ops.linear with fast=True always, so oneDNN is switched off too, for a reference with no fast path."""
    model.set_fused_attn(False)
    monkeypatch.setattr(ops, "_onednn_usable", lambda x: False)


@pytest.mark.parametrize("version", [1, 2])
def test_whole_model_fast_paths_match_plain_ops(version, monkeypatch):
    model = small_model(version).eval()
    sizes = ((224, 224), (200, 312))
    inputs = {size: torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1])) for size in sizes}
    results = {}
    for fused in (True, False):
        model.set_fused_attn(fused)
        for size in sizes:
            for mode, context in MODES.items():
                with context():
                    results[size, fused, mode] = model(inputs[size]).clone()
    with monkeypatch.context() as patch:
        all_plain(patch, model)
        with torch.no_grad():
            references = {size: model(inputs[size]) for size in sizes}
    for size, reference_out in references.items():
        assert reference_out.abs().max() > 0.1 and torch.isfinite(reference_out).all()
        for (s, fused, mode), out in results.items():
            if s == size:
                assert max_diff(out, reference_out) < 1e-4, (size, fused, mode)


@pytest.mark.parametrize("version", [1, 2])
def test_whole_model_fast_paths_match_plain_ops_in_training(version, monkeypatch):
    """Forward and every parameter gradient with autograd recording: oneDNN linear with its backward
    and fused attention against F.linear and explicit softmax attention."""
    fast = small_model(version).eval()  # eval: no dropout, but the graph is recorded
    plain = copy.deepcopy(fast)
    x = torch.randn(2, 3, 72, 104, generator=torch.Generator().manual_seed(3))
    outs = []
    for model in (fast, plain):
        with monkeypatch.context() as patch:
            if model is plain:
                all_plain(patch, plain)
            out = model(x)
            assert out.grad_fn is not None
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
    assert max_diff(*outs) < 1e-4
    grads = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        q = grads[name].grad
        assert (p.grad - q).abs().max() <= 1e-4 + 1e-3 * q.abs().max(), name


# ---------------------------------------------------------------------------------------------
# inference_mode then training, and back (cached index / mask / bias tensors)


def train_step(model, x, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return loss


@pytest.mark.parametrize("version", [1, 2])
def test_training_after_inference_mode(version):
    """Used to fail with "Inference tensors cannot be saved for backward": index and mask tensors
    cached during an inference_mode forward were inference tensors."""
    model = small_model(version).eval()
    x = torch.randn(2, 3, 100, 76)
    labels = torch.tensor([1, 4])
    with torch.inference_mode():
        before = model(x)
    train_step(model, x, labels)  # same size: every cached tensor is reused
    model.eval()
    with torch.no_grad():  # and a plain no_grad forward still agrees
        assert max_diff(model(x), before) < 1e-5


@pytest.mark.parametrize("version", [1, 2])
def test_inference_mode_after_training_and_training_again(version):
    model = small_model(version)
    x = torch.randn(2, 3, 100, 76)
    labels = torch.tensor([0, 6])
    train_step(model, x, labels)
    model.eval()
    with torch.inference_mode():
        first = model(x)
    with torch.no_grad():
        second = model(x)
    assert max_diff(first, second) < 1e-5
    train_step(model, x, labels)
    train_step(model, x, labels)


def _data_write(params):
    class DataWrite:  # an EMA-style update through `.data`: no version-counter bump
        def step(self):
            for p in params:
                p.data.add_(p.grad, alpha=-0.5)

    return DataWrite()


UPDATES = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=0.05, foreach=True),
    # torch 2.14's fused CPU kernel updates the parameters without bumping their version counters
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
    "data-write": _data_write,
}


@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("version", [1, 2])
def test_cached_attention_bias_follows_parameter_updates(version, update):
    """The inference bias cache must notice any in-place update of the bias parameters."""
    model = small_model(version)
    x = torch.randn(1, 3, 100, 76)
    model.eval()
    with torch.inference_mode():
        model(x)  # fills the caches
    with torch.no_grad():
        model(x)
    optimizer = UPDATES[update](list(model.parameters()))
    train_step(model, x, torch.tensor([2]))
    optimizer.step()  # changes the bias tables / cpb MLP in place
    model.eval()
    fresh = swinx.SwinTransformer(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert max_diff(model(x), fresh(x)) < 1e-5
    with torch.no_grad():
        assert max_diff(model(x), fresh(x)) < 1e-5


# ---------------------------------------------------------------------------------------------
# A shifted block at a padded size: fused attention (SDPA, 4-D mask) against the exact path


def shifted_block(version, dim=32, heads=2, seed=0):
    block = SwinBlock(dim, heads, window_size=7, shift_size=3, version=version)
    return randomize(block, seed).eval()


@pytest.mark.parametrize("version", [1, 2])
def test_shifted_block_fused_matches_exact_at_padded_size(version):
    block = shifted_block(version)
    x = torch.randn(2, 13, 17, 32)  # padded to 14 x 21: 2 x 3 windows of 7 x 7
    with torch.no_grad():
        geometry_out = block.window_attention(x, return_attn=True)  # exact path, always
        fused = block(x)
        block.attn.fused = block.mlp.fused = False
        exact = block(x)
    assert fused.shape == x.shape
    assert max_diff(fused, exact) < 1e-5
    _, attn = geometry_out
    assert attn.shape == (2, 6, 2, 49, 49)
    # with grad: same outputs and same input gradient through both paths
    outs, grads = [], []
    for fused_flag in (True, False):
        block.attn.fused = block.mlp.fused = fused_flag
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    assert max_diff(*outs) < 1e-5
    assert max_diff(*grads) <= 1e-4 * max(1.0, grads[1].abs().max().item())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "exact"])
def test_shift_mask_separates_regions_that_the_roll_brings_together(fused):
    """Token (0, 0) rolls into the bottom-right window beside token (12, 0) (13 x 17 map, window 7,
    shift 3, padded to 14 x 21); the mask must keep them from seeing each other, while (1, 1),
    in the same region, does see (0, 0). Without the mask (the control), (12, 0) would change."""

    def response(block):
        block.attn.fused = block.mlp.fused = fused
        x = torch.randn(1, 13, 17, 32, generator=torch.Generator().manual_seed(5))
        y = x.clone()
        y[0, 0, 0, 0] += 3.0  # one channel: LayerNorm would undo a shift of all of them
        with torch.no_grad():
            return (block(y) - block(x)).abs().amax(-1)[0]  # (13, 17) change per token

    block = shifted_block(1)
    change = response(block)
    assert change[1, 1] > 1e-3 and change[0, 0] > 1e-3
    assert change[12, 0] < 1e-6, change[12, 0]
    elsewhere = change.clone()
    elsewhere[:3, :3] = 0  # (0, 0)'s region of its shifted window
    assert elsewhere.max() < 1e-6  # nothing else sees the change

    unmasked = shifted_block(1)
    unmasked.attn.shift_mask = lambda geometry, padded: None
    assert response(unmasked)[12, 0] > 1e-3  # the check above can fail


@pytest.mark.parametrize("fused_wins", [True, False, None])
def test_bfloat16_inference_picks_the_faster_attention_per_shape_and_both_agree(fused_wins, monkeypatch):
    """CPU bfloat16 inference times the fused kernel against plain matmuls once per shape (None: really
    timed here) and keeps the winner; either way the output is the plain path's, to bfloat16 precision.
    This is the path where swinx's C kernel is not built (it would take these calls otherwise)."""
    from swinx.model import attention, native

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(attention, "_BF16_FUSED", {})
    torch.manual_seed(0)
    model = swinx.create_model("swin_t", embed_dim=32, depths=(2, 2), num_heads=(1, 2), img_size=56).eval()
    x = torch.randn(2, 3, 56, 56)
    if fused_wins is not None:  # best_seconds times the fused kernel first, then the matmuls
        times = itertools.cycle((0.0, 1.0) if fused_wins else (1.0, 0.0))
        monkeypatch.setattr(ops, "best_seconds", lambda fn: next(times))
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        out = model(x).float()
        choices = dict(attention._BF16_FUSED)
        again = model(x).float()
    assert len(choices) >= 2 and attention._BF16_FUSED == choices  # one entry per shape, none added the 2nd time
    if fused_wins is not None:
        assert set(choices.values()) == {fused_wins}
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    model.set_fused_attn(False)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        plain = model(x).float()
    torch.testing.assert_close(out, plain, rtol=0.05, atol=0.05)
    with torch.inference_mode():
        exact = model(x)
    assert (out - exact).abs().max() < 0.1


def test_training_takes_onednn_only_where_it_is_timed_faster(monkeypatch):
    monkeypatch.undo()  # the real chooser, not the autouse fixture's
    monkeypatch.setattr(ops, "_TRAIN_CHOICE", {})
    x, weight, b = operands((2, 9, 24), requires_grad=True)
    for onednn_wins in (True, False):
        ops._TRAIN_CHOICE.clear()
        times = itertools.cycle((0.5, 1.0) if onednn_wins else (1.0, 0.5))  # oneDNN is timed first
        monkeypatch.setattr(ops, "best_seconds", lambda fn: next(times))
        y = ops.linear(x, weight, b)
        assert ops._TRAIN_CHOICE == {(18, 24, 40, torch.float32): onednn_wins}
        assert ("OneDNNLinear" in str(y.grad_fn)) == onednn_wins
        torch.testing.assert_close(y, reference(x, weight, b, False), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(ops, "best_seconds", lambda fn: pytest.fail("timed twice"))
    ops.linear(x, weight, b)  # the choice is remembered
    ops._TRAIN_CHOICE.clear()
    monkeypatch.undo()
    assert ops.best_seconds(lambda: sum(range(1000))) > 0


def test_weight_gradient_takes_the_orientation_timed_faster_and_both_agree(monkeypatch):
    """`_weight_grad` computes grad^T x directly or as (x^T grad)^T, whichever BLAS ran faster for the
    shape, timed once; both give the (out, in) gradient of F.linear, contiguous like the weight."""
    monkeypatch.setattr(ops, "_WGRAD_CHOICE", {})
    x, weight, b = operands((2, 9, 24), requires_grad=True)
    grad = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(5))
    expected = torch.autograd.grad(F.linear(x, weight, b), weight, grad)[0]
    for transposed_wins in (True, False):
        ops._WGRAD_CHOICE.clear()
        times = itertools.cycle((1.0, 0.5) if transposed_wins else (0.5, 1.0))  # the direct product first
        monkeypatch.setattr(ops, "best_seconds", lambda fn: next(times))
        y = ops.linear(x, weight, b)
        assert "OneDNNLinear" in str(y.grad_fn)
        got = torch.autograd.grad(y, weight, grad)[0]
        assert ops._WGRAD_CHOICE == {(18, 24, 40, torch.float32): transposed_wins}
        assert got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(ops, "best_seconds", lambda fn: pytest.fail("timed twice"))
    torch.autograd.grad(ops.linear(x, weight, b), weight, grad)  # the choice is remembered


# ---------------------------------------------------------------------------------------------
# The lean MLP (training saves the input and fc1's output only)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("shape", [(6, 24), (2, 7, 5, 24)])
@pytest.mark.parametrize("onednn", [True, False])
def test_lean_mlp_matches_autograd(norm, shape, onednn, monkeypatch):
    """Output and every gradient against autograd through F.layer_norm, F.linear and F.gelu, with
    random affine parameters, for both kernel choices."""
    monkeypatch.setattr(ops, "_onednn_trains_faster", lambda x, weight: onednn)
    monkeypatch.setattr(ops, "_TRAIN_CHOICE", {})
    g = torch.Generator().manual_seed(len(shape) + 2 * norm)
    C, hidden = shape[-1], 4 * shape[-1]
    params = [
        1 + 0.3 * torch.randn(C, generator=g),
        0.2 * torch.randn(C, generator=g),
        torch.randn(hidden, C, generator=g) / C**0.5,
        0.3 * torch.randn(hidden, generator=g),
        torch.randn(C, hidden, generator=g) / hidden**0.5,
        0.3 * torch.randn(C, generator=g),
    ]
    if not norm:
        params[:2] = [None, None]
    x = 2 * torch.randn(shape, generator=g) + 0.5
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, *params)]
    copies = [t.clone().requires_grad_() if t is not None else None for t in (x, *params)]
    x1, nw, nb, w1, b1, w2, b2 = leaves
    out = ops.lean_mlp(x1, nw, nb, 1e-5, w1, b1, w2, b2)
    x2, nw2, nb2, w1b, b1b, w2b, b2b = copies
    h = F.layer_norm(x2, (C,), nw2, nb2, 1e-5) if norm else x2
    ref = F.linear(F.gelu(F.linear(h, w1b, b1b)), w2b, b2b)
    assert out.shape == ref.shape and out.grad_fn is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_same_backward(out, ref, leaves, copies, seed=len(shape))


def test_lean_mlp_is_taken_only_where_it_applies():
    mlp = Mlp(8, 32)
    norm = torch.nn.LayerNorm(8)
    x = torch.randn(3, 8)
    assert "LeanMlp" in str(mlp(x, norm).grad_fn) and "LeanMlp" in str(mlp(x).grad_fn)
    with torch.no_grad():
        assert mlp(x, norm).grad_fn is None
    with torch.autocast("cpu", torch.bfloat16):
        assert "LeanMlp" not in str(mlp(x, norm).grad_fn)
    with ops.plain_ops():
        assert "LeanMlp" not in str(mlp(x, norm).grad_fn)
    mlp.fused = False
    assert "LeanMlp" not in str(mlp(x, norm).grad_fn)
    dropping = Mlp(8, 32, drop=0.1)
    assert "LeanMlp" not in str(dropping(x, norm).grad_fn)
    assert "LeanMlp" in str(dropping.eval()(x, norm).grad_fn)  # eval: no dropout, still recording
    frozen = Mlp(8, 32).requires_grad_(False)
    assert frozen(x).grad_fn is None


def test_lean_mlp_saves_less_than_autograd():
    """The point of it: a training forward of a V1 block keeps fewer activation bytes."""
    block = SwinBlock(32, 2, 7, 3)
    x = torch.randn(2, 14, 14, 32)

    def saved_bytes(fused):
        block.mlp.fused = fused
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        return sum(storages.values())

    lean, plain = saved_bytes(True), saved_bytes(False)
    tokens, C = 2 * 14 * 14, 32
    assert plain - lean >= 0.9 * tokens * 5 * C * 4  # the norm's output (C) and the GELU's (4C), float32


def test_lean_mlp_times_each_layer_on_its_own_input(monkeypatch):
    """The real chooser (not the autouse fixture's): each layer is timed at its own shape."""
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_TRAIN_CHOICE", {})
    mlp = Mlp(8, 32)
    out = mlp(torch.randn(2, 5, 8), torch.nn.LayerNorm(8))
    out.sum().backward()
    assert {key[:3] for key in ops._TRAIN_CHOICE} == {(10, 8, 32), (10, 32, 8)}
    assert all(p.grad is not None for p in mlp.parameters())


# ---------------------------------------------------------------------------------------------
# Under torch.compile: the same kernels as custom operators


@pytest.fixture
def fresh_dynamo():
    """Each test compiles its own functions: code compiled for one must not serve, or count against, another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _recording_backend(graphs: list[str]):
    """aot_eager (dynamo's graph, then AOT autograd, run eagerly), keeping the code of each graph dynamo made."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    return backend


def _lean_operands(shape, norm, seed):
    g = torch.Generator().manual_seed(seed)
    C, hidden = shape[-1], 4 * shape[-1]
    params = [
        1 + 0.3 * torch.randn(C, generator=g) if norm else None,
        0.2 * torch.randn(C, generator=g) if norm else None,
        torch.randn(hidden, C, generator=g) / C**0.5,
        0.3 * torch.randn(hidden, generator=g),
        torch.randn(C, hidden, generator=g) / hidden**0.5,
        0.3 * torch.randn(C, generator=g),
    ]
    return 2 * torch.randn(shape, generator=g) + 0.5, params


@pytest.mark.parametrize("op", ["linear", "train_linear", "lean_mlp", "materialize"])
def test_custom_operators_pass_torch_library_opcheck(op):
    """Schema, fake (meta) functions, autograd registration and AOT dispatch, checked by torch itself."""
    x, weight, b = operands((3, 5, 24), requires_grad=True)
    if op == "linear":
        with torch.no_grad():
            for gelu in (False, True):
                torch.library.opcheck(torch.ops.swinx.linear.default, (x.detach(), weight.detach(), b.detach(), gelu))
    elif op == "train_linear":
        for bias in (b, None):
            torch.library.opcheck(torch.ops.swinx.train_linear.default, (x, weight, bias))
    elif op == "lean_mlp":
        for norm in (True, False):
            x, (nw, nb, w1, b1, w2, b2) = _lean_operands((2, 7, 24), norm, seed=int(norm))
            args = [t.requires_grad_() if t is not None else None for t in (x, nw, nb, w1, b1, w2, b2)]
            torch.library.opcheck(torch.ops.swinx.lean_mlp.default, (*args[:3], 1e-5, *args[3:]))
    else:
        torch.library.opcheck(torch.ops.swinx.materialize.default, (x,))


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_compiled_linear_goes_through_our_operators_and_matches(gelu, bias, onednn, monkeypatch):
    """torch.compile keeps ops.linear as swinx operators (inference and training), with the output and
    every gradient of the eager path, whichever kernel the run-time choice takes."""
    monkeypatch.setattr(ops, "_onednn_trains_faster", lambda x, weight: onednn)
    monkeypatch.setattr(ops, "_TRAIN_CHOICE", {})
    graphs: list[str] = []
    fn = torch.compile(lambda x, w, b: ops.linear(x, w, b, gelu), backend=_recording_backend(graphs), fullgraph=True)
    leaves = operands((2, 9, 24), bias=bias, requires_grad=True)
    copies = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    with torch.no_grad():
        torch.testing.assert_close(fn(*leaves), reference(*leaves, gelu), rtol=1e-5, atol=1e-5)
    assert "torch.ops.swinx.linear" in graphs[-1]
    out, ref = fn(*leaves), reference(*copies, gelu)
    assert "torch.ops.swinx.train_linear" in graphs[-1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_same_backward(out, ref, leaves, copies, seed=1)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("norm", [True, False])
def test_compiled_lean_mlp_goes_through_our_operator_and_matches(norm, onednn, monkeypatch):
    monkeypatch.setattr(ops, "_onednn_trains_faster", lambda x, weight: onednn)
    monkeypatch.setattr(ops, "_TRAIN_CHOICE", {})
    x, params = _lean_operands((2, 7, 5, 24), norm, seed=3 + int(norm))
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, *params)]
    copies = [t.clone().requires_grad_() if t is not None else None for t in (x, *params)]
    graphs: list[str] = []

    def mlp(x, nw, nb, w1, b1, w2, b2):
        return ops.lean_mlp(x, nw, nb, 1e-5, w1, b1, w2, b2)

    out = torch.compile(mlp, backend=_recording_backend(graphs), fullgraph=True)(*leaves)
    assert "torch.ops.swinx.lean_mlp" in graphs[-1]
    x2, nw, nb, w1, b1, w2, b2 = copies
    h = F.layer_norm(x2, (x.shape[-1],), nw, nb, 1e-5) if norm else x2
    ref = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_same_backward(out, ref, leaves, copies, seed=2)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_graphs_keep_plain_aten_where_our_operators_do_not_belong(monkeypatch):
    """Autocast, export and inductor's freezing (inference, where its GEMM is the faster) see F.linear, not
    our operators; so does eager code."""
    x, weight, b = operands((4, 24))
    graphs: list[str] = []
    fn = torch.compile(lambda x, w, b: ops.materialized(ops.linear(x, w, b)), backend=_recording_backend(graphs))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        fn(x, weight, b)
    assert "swinx.linear" not in graphs[-1] and "swinx.materialize" in graphs[-1]
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    monkeypatch.setattr(ops, "_FROZEN_CHOICE", [False])  # freezing's prepacked GEMM timed faster than ours
    with torch.no_grad(), inductor_config.patch(freezing=True):
        torch.testing.assert_close(fn(x, weight, b), reference(x, weight, b, False), rtol=1e-5, atol=1e-5)
    assert "swinx" not in graphs[-1]

    class Layer(torch.nn.Module):
        def forward(self, x):
            return ops.materialized(ops.linear(x, weight, b))

    program = torch.export.export(Layer(), (x,))
    assert "swinx" not in str(program.graph)
    assert ops.materialized(x) is x  # eager: no copy


@pytest.mark.usefixtures("fresh_dynamo")
def test_freezing_keeps_our_operators_where_onednn_is_timed_faster(monkeypatch):
    """Under freezing, the choice between our oneDNN linear and inductor's prepacked GEMM is timed once per
    process, inside the trace (without a graph break), and a frozen graph that keeps ours matches eager."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(ops, "_FROZEN_CHOICE", [])
    x, weight, b = operands((4, 24))
    graphs: list[str] = []
    backend = _recording_backend(graphs)
    fn = torch.compile(lambda x: ops.linear(x, weight, b, gelu=True), backend=backend, fullgraph=True)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        torch.testing.assert_close(fn(x), reference(x, weight, b, True), rtol=1e-5, atol=1e-5)
    assert len(ops._FROZEN_CHOICE) == 1 and isinstance(ops._FROZEN_CHOICE[0], bool)
    assert ("torch.ops.swinx.linear" in graphs[-1]) == ops._FROZEN_CHOICE[0]
    assert ops._onednn_beats_frozen_gemm() is ops._FROZEN_CHOICE[0]  # asked again: the same answer, not retimed

    torch._dynamo.reset()
    monkeypatch.setattr(ops, "_FROZEN_CHOICE", [True])
    with torch.no_grad(), inductor_config.patch(freezing=True):
        out = torch.compile(lambda x: ops.linear(x, weight, b), backend="inductor")(x)
    torch.testing.assert_close(out, reference(x, weight, b, False), rtol=1e-5, atol=1e-5)


def test_materialize_is_an_identity_with_a_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.ops.swinx.materialize(x)
    assert y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, x)
    (y * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(4.0).expand(3, 4))


RESIZES = [  # (N, C, h, w) -> (H, W): integer and fractional factors, downsampling, sides of 1, the threshold
    ((2, 3, 6, 6), (48, 48)),
    ((2, 5, 12, 7), (192, 100)),
    ((1, 4, 7, 13), (30, 31)),
    ((3, 2, 50, 40), (17, 23)),
    ((2, 3, 1, 1), (6, 6)),
    ((1, 2, 1, 9), (5, 20)),
    ((1, 3, ops.RESIZE_MAX_SIDE, 33), (256, 130)),
]


@pytest.mark.parametrize("shape, size", RESIZES)
def test_bilinear_resize_matches_interpolate_with_gradients(shape, size):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    grad = torch.randn(*shape[:2], *size, dtype=torch.float64)
    assert ops._resizes_by_products(x.float(), size)
    exact_x = x.clone().requires_grad_()
    exact = F.interpolate(exact_x, size, mode="bilinear", align_corners=False)  # float64: the reference
    exact.backward(grad)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2**-7)):
        ours_x = x.to(dtype).requires_grad_()
        ours = ops.bilinear_resize(ours_x, size)
        ours.backward(grad.to(dtype))
        assert ours.dtype == dtype and ours.shape == exact.shape
        scale = exact.abs().max()
        assert max_diff(ours.double(), exact) <= tol * scale
        assert max_diff(ours_x.grad.double(), exact_x.grad) <= tol * exact_x.grad.abs().max()
        if dtype == torch.bfloat16:  # computed in float32 and rounded once, as PyTorch's own bf16 kernel
            theirs = F.interpolate(x.to(dtype), size, mode="bilinear", align_corners=False)
            assert max_diff(ours.double(), theirs.double()) <= 2**-7 * scale


def test_bilinear_resize_under_autocast_keeps_the_inputs_dtype():
    x = torch.randn(2, 4, 12, 12).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ops.bilinear_resize(x, (48, 48))
        float_inside = ops.bilinear_resize(x.float(), (48, 48))
    assert inside.dtype == torch.bfloat16 and float_inside.dtype == torch.float32
    assert torch.equal(inside, ops.bilinear_resize(x, (48, 48)))
    assert torch.equal(float_inside, ops.bilinear_resize(x.float(), (48, 48)))


def test_bilinear_resize_leaves_large_inputs_and_traces_to_interpolate():
    big = torch.randn(1, 2, ops.RESIZE_MAX_SIDE + 1, 8)
    assert not ops._resizes_by_products(big, (200, 30))
    assert torch.equal(ops.bilinear_resize(big, (200, 30)), F.interpolate(big, (200, 30), mode="bilinear"))
    small = torch.randn(1, 2, 8, 8)
    assert ops.bilinear_resize(small, (8, 8)) is small
    with ops.plain_ops():
        assert not ops._resizes_by_products(small, (32, 32))
    traced = torch.jit.trace(lambda t: ops.bilinear_resize(t, (32, 32)), small)
    assert "upsample_bilinear2d" in str(traced.graph) and "matmul" not in str(traced.graph)


def test_bilinear_resize_trains_after_inference_mode_built_its_matrices():
    """The weight matrices are cached: made first under inference_mode (an evaluation), they must
    still serve a training step's backward."""
    ops._bilinear_matrix.cache_clear()
    with torch.inference_mode():
        ops.bilinear_resize(torch.randn(1, 2, 9, 11), (36, 40))
    x = torch.randn(1, 2, 9, 11, requires_grad=True)
    ops.bilinear_resize(x, (36, 40)).square().sum().backward()
    y = x.detach().clone().requires_grad_()
    F.interpolate(y, (36, 40), mode="bilinear", align_corners=False).square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)
