"""Compilation, tracing and export: torch.compile, torch.jit.trace and torch.export agree with eager.

Every test builds a model with every parameter randomised (helpers.randomize), so a wrong
constant folded into a graph (a stale position bias, a shift mask of the wrong geometry)
shows as a mismatch. Tests 1 and 2 use the real swin_t; the rest use small configs to keep
the file within a few minutes on a CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

import swinx
from helpers import SMALL, max_diff, randomize

pytestmark = pytest.mark.slow

TOL = 1e-4


def swin_t(seed: int = 0) -> swinx.SwinTransformer:
    return randomize(swinx.create_model("swin_t"), seed=seed).eval()


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code from one test must not serve another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----- 1. torch.compile, inference --------------------------------------------------------------


def test_compile_swin_t_matches_eager():
    model = swin_t()
    x = images(2, 3, 224, 224)
    compiled = torch.compile(model)
    with torch.no_grad():
        got = compiled(x)  # compiled first: nothing cached by an eager call can serve it
        want = model(x)
        again = compiled(images(2, 3, 224, 224, seed=1))
        want_again = model(images(2, 3, 224, 224, seed=1))
    assert got.shape == (2, 1000)
    assert torch.isfinite(got).all()
    assert max_diff(got, want) < TOL
    assert max_diff(again, want_again) < TOL


def test_compile_swin_t_has_no_graph_breaks():
    """The whole inference forward is one graph: attention.py keeps its bias cache out of compiled code
    (`caching_allowed`) precisely so that it costs no graph break."""
    model = swin_t()
    x = images(2, 3, 224, 224)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    reasons = sorted(
        {
            r.reason.splitlines()[0]
            + " @ "
            + " > ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in r.user_stack[-2:])
            for r in explanation.break_reasons
        }
    )
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


# ----- 2. torch.jit.trace -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape branches, fixed at 224
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated in torch 2.14, still supported
def test_trace_swin_t_matches_eager():
    model = swin_t()
    x = images(2, 3, 224, 224)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        got = traced(x)
        want = model(x)
    assert got.shape == (2, 1000)
    assert max_diff(got, want) < TOL
    # The position bias is computed in the graph from the live table, not folded in as a constant.
    with torch.no_grad():
        model.layers[2].blocks[1].attn.relative_position_bias_table.mul_(-1.5)
        changed = model(x)
        assert max_diff(changed, want) > 1e-3
        assert max_diff(traced(x), changed) < TOL


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape branches, fixed at 224
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated in torch 2.14, still supported
def test_trace_small_v2_matches_eager():
    model = randomize(swinx.create_model("swinv2_t", **SMALL), seed=2).eval()
    x = images(2, 3, 256, 256, seed=2)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        got = traced(x)
        want = model(x)
    assert got.shape == (2, 1000)
    assert max_diff(got, want) < TOL


# ----- 3. torch.export --------------------------------------------------------------------------


def test_export_swin_t_matches_eager():
    model = swin_t()
    x = images(2, 3, 224, 224)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        got = program.module()(x)
        want = model(x)
    assert got.shape == (2, 1000)
    assert max_diff(got, want) < TOL


def test_export_under_no_grad_matches_eager():
    """Exporting inside torch.no_grad(), the usual inference setting, works as well."""
    model = randomize(swinx.create_model("swin_t", **SMALL), seed=3).eval()
    x = images(2, 3, 224, 224, seed=3)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        got = program.module()(x)
        want = model(x)
    assert max_diff(got, want) < TOL


# ----- 4. torch.compile, training ---------------------------------------------------------------


def test_compile_small_v1_training_gradients_match_eager():
    torch.manual_seed(0)
    config = dict(SMALL, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, num_classes=10)
    eager = randomize(swinx.create_model("swin_t", **config), seed=4).train()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    # 160x96: the stage maps 40x24, 20x12, 10x6, 5x3 need padding, shifts and the clamped window.
    x = images(2, 3, 160, 96, seed=4)
    target = torch.tensor([3, 7])

    loss_eager = torch.nn.functional.cross_entropy(eager(x), target)
    loss_eager.backward()
    loss_compiled = torch.nn.functional.cross_entropy(compiled(x), target)
    loss_compiled.backward()

    assert abs(loss_eager.item() - loss_compiled.item()) < TOL
    names = [
        "patch_embed.proj.weight",
        "layers.0.blocks.1.attn.relative_position_bias_table",  # shifted block: bias through the mask path
        "layers.1.blocks.0.attn.qkv.weight",
        "layers.2.downsample.reduction.weight",
        "layers.3.blocks.1.mlp.fc1.bias",
        "head.weight",
    ]
    eager_params, compiled_params = dict(eager.named_parameters()), dict(twin.named_parameters())
    for name in names:
        want, got = eager_params[name].grad, compiled_params[name].grad
        assert want is not None and got is not None, name
        assert want.abs().max() > 0, name
        assert max_diff(got, want) < TOL, name
    # Every parameter got a gradient in both.
    assert all((p.grad is None) == (compiled_params[n].grad is None) for n, p in eager_params.items())


# ----- dynamic shapes: one graph for every input size ---------------------------------------------
# Sizes whose last-stage map stays larger than the window: a map that fits in one window
# switches to the clamp rule, a different network, and rightly gets a second graph. Some of
# these sizes need padding at every stage and some at none (e.g. 252 = 7 * 36, 512 = 8 * 64).
DYNAMIC_SIZES = {
    1: [(2, 256, 288), (3, 288, 320), (2, 320, 256), (4, 272, 352), (2, 260, 300), (3, 512, 384), (2, 252, 280)],
    2: [(2, 288, 320), (3, 320, 352), (2, 352, 288), (4, 300, 340), (3, 512, 384), (2, 512, 512)],
}


@pytest.mark.parametrize("version", [1, 2])
def test_dynamic_compile_never_recompiles_for_a_new_size(version):
    """Compiled once with dynamic shapes, the model serves new batch sizes, heights and widths
    (square or not, padded or not) without recompiling: a recompilation raises.

    The eager backend keeps the test fast; recompilation is decided by dynamo's guards, which are
    the same whatever the backend (swin_t under inductor: see the README's performance notes)."""
    model = randomize(swinx.create_model("swin_t" if version == 1 else "swinv2_t", **SMALL), seed=version).eval()
    compiled = torch.compile(model, dynamic=True, backend="eager", fullgraph=True)
    first, *others = DYNAMIC_SIZES[version]
    with torch.inference_mode():
        compiled(images(*first[:1], 3, *first[1:]))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch, h, w in others:
                x = images(batch, 3, h, w, seed=h + w)
                assert max_diff(compiled(x), model(x)) < TOL, (h, w)
