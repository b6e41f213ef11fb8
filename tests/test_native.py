"""swinx's C window-attention kernel (swinx.model.native, csrc/window_attention.c): exact against the
plain softmax math at every window, head and bias layout, used by the model where it can run, and
replaced by PyTorch's kernels where it cannot be built."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
import torch

from helpers import max_diff
from swinx.model import attention, native, ops
from swinx.model.config import SwinConfig
from swinx.model.swin import SwinTransformer

HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None and os.environ.get("SWINX_NATIVE", "1") != "0"
needs_kernels = pytest.mark.skipif(not HAVE_CC, reason="no C compiler here: the kernels cannot be built")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A library built into an empty cache folder, and the usual one back afterwards."""
    monkeypatch.setenv("SWINX_CACHE", str(tmp_path))
    native.reset()
    yield tmp_path / "kernels"
    native.reset()


def reference(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v in float64, (B, nW, heads, N, D) -> (B, nW, N, heads * D)."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    B, nW, heads, N, D = q.shape
    attn = torch.softmax((q * scale) @ k.transpose(-2, -1) + bias.reshape(1, -1, heads, N, N), dim=-1)
    return (attn @ v).transpose(2, 3).reshape(B, nW, N, heads * D)


def windows_of(t, tokens, nW, N):
    """(B, L, heads, D) map tokens -> (B, nW, heads, N, D) windows, by the `tokens` table."""
    return t[:, tokens].unflatten(1, (nW, N)).transpose(2, 3)


@needs_kernels
def test_the_kernels_build_where_there_is_a_compiler():
    assert native.library() is not None, native.reason()
    assert native.reason() == ""


@needs_kernels
@pytest.mark.parametrize("window", [(7, 7), (3, 5), (1, 1), (12, 12), (4, 16)])
@pytest.mark.parametrize("head_dim", [32, 24, 16, 48])
@pytest.mark.parametrize("per_window_bias", [False, True])
def test_kernel_matches_softmax_attention(window, head_dim, per_window_bias):
    """q, k, v read straight out of a qkv layer's (B, L, 3, heads, D) output for a whole map, windows
    cut by a shuffled token table (as a roll and partition would), the output written back in map
    order; the bias carries a shift mask (-100) and some -inf keys (never a whole row)."""
    torch.manual_seed(sum(window) * head_dim + per_window_bias)
    B, nW, heads, N, D = 2, 3, 3, window[0] * window[1], head_dim
    L = nW * N
    qkv = torch.randn(B, L, 3, heads, D) * 2
    q, k, v = qkv.unbind(2)
    tokens = torch.randperm(L)
    bias = torch.randn(nW if per_window_bias else 1, heads, N, N)
    if N > 2:
        bias[..., : N // 2, -1] = -100.0
        bias[..., 1, 0] = float("-inf")
    out = attention._native_attention(qkv, tokens, attention.pad_keys(bias), D**-0.5)
    assert out.shape == (B, L, heads * D) and out.is_contiguous()
    expected = torch.empty(B, L, heads * D, dtype=torch.float64)
    expected[:, tokens] = reference(*(windows_of(t, tokens, nW, N) for t in (q, k, v)), bias, D**-0.5).flatten(1, 2)
    assert max_diff(out.double(), expected) < 2e-5


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 3, 49, 32), (3, 2, 15, 24), (2, 2, 144, 16), (2, 1, 1, 16)])
@pytest.mark.parametrize("per_window_bias", [False, True])
def test_kernel_gradients_match_softmax_attention(shape, per_window_bias):
    """The backward (probabilities recomputed from the saved log-sum-exp) against autograd through the
    plain math: q, k, v through a shared qkv tensor, the bias through its padding, shuffled tokens."""
    nW, heads, N, D = shape
    torch.manual_seed(N * D + per_window_bias)
    B, L = 2, nW * N
    qkv = torch.randn(B, L, 3, heads, D, requires_grad=True)
    table = torch.randn(nW if per_window_bias else 1, heads, N, N, requires_grad=True)
    tokens, grad = torch.randperm(L), torch.randn(B, L, heads * D)
    attention._native_attention(qkv, tokens, attention.pad_keys(table), D**-0.5).backward(grad)
    ours = qkv.grad.clone(), table.grad.clone()
    qkv.grad = table.grad = None
    expected = torch.empty(B, L, heads * D)
    windows = [windows_of(t, tokens, nW, N) for t in qkv.unbind(2)]
    expected[:, tokens] = reference(*windows, table, D**-0.5).flatten(1, 2).float()
    expected.backward(grad)
    assert max_diff(ours[0], qkv.grad) < 1e-5 and max_diff(ours[1], table.grad) < 1e-5


HAVE_BF16_DOT = "avx512_bf16" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False


@pytest.fixture(params=["this CPU's build", "without bf16 dot products"])
def bf16_build(request, tmp_path, monkeypatch):
    """The kernels as built here (vdpbf16ps where the CPU has AVX512-BF16) and built with
    -DSWINX_NO_BF16_DOT, the float32-inside bfloat16 path of every other core."""
    if request.param != "this CPU's build":
        monkeypatch.setenv("SWINX_NATIVE_CFLAGS", "-DSWINX_NO_BF16_DOT")
        monkeypatch.setenv("SWINX_CACHE", str(tmp_path))
        native.reset()
    yield request.param
    native.reset()


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 3, 49, 32), (2, 2, 144, 32), (3, 2, 15, 24), (2, 2, 64, 48), (2, 2, 9, 16)])
@pytest.mark.parametrize("per_window_bias", [False, True])
def test_bfloat16_kernel_matches_float64_attention(shape, per_window_bias, bf16_build):
    """bfloat16 q, k, v in, bfloat16 out and bfloat16 gradients, float32 sums inside: within bfloat16's
    rounding of the float64 answer (its 8 bits: 2^-8 = 0.4% of the largest value). Windows of 49 and 64
    tokens take the scores-in-registers path on AVX512-BF16 cores, 144 the general one; head dims 16,
    24 and 48 part-fill the last 32 bfloat16 of a row."""
    nW, heads, N, D = shape
    torch.manual_seed(N * D + per_window_bias)
    B = 2
    L = nW * N
    qkv = torch.randn(B, L, 3, heads, D).bfloat16().requires_grad_()
    table = torch.randn(nW if per_window_bias else 1, heads, N, N, requires_grad=True)
    tokens, grad = torch.randperm(L), torch.randn(B, L, heads * D).bfloat16()
    out = attention._native_attention(qkv, tokens, attention.pad_keys(table), D**-0.5)
    assert out.dtype == torch.bfloat16
    out.backward(grad)
    exact_qkv, exact_table = qkv.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    expected = torch.zeros(B, L, heads * D, dtype=torch.float64)
    windows = [windows_of(t, tokens, nW, N) for t in exact_qkv.unbind(2)]
    expected[:, tokens] = reference(*windows, exact_table, D**-0.5).flatten(1, 2)
    expected.backward(grad.double())

    def relative(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert qkv.grad.dtype == torch.bfloat16 and table.grad.dtype == torch.float32
    assert relative(out, expected) < 8e-3
    assert relative(qkv.grad, exact_qkv.grad) < 8e-3 and relative(table.grad, exact_table.grad) < 8e-3


@needs_kernels
@pytest.mark.skipif(not HAVE_BF16_DOT, reason="this CPU has no AVX512-BF16")
def test_bfloat16_dot_products_are_the_path_taken_here(tmp_path, monkeypatch):
    """On an AVX512-BF16 core the build takes the vdpbf16ps paths, forward and backward (probabilities and
    their gradients rounded to bfloat16 give other last bits than the float32-inside path), and both
    agree within bfloat16's rounding."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 4 * 49, 3, 3, 32).bfloat16()
    tokens, table = torch.randperm(4 * 49), torch.randn(1, 3, 49, 49)
    grad = torch.randn(2, 4 * 49, 3 * 32).bfloat16()
    outs, grads = [], []
    for flags in ("", "-DSWINX_NO_BF16_DOT"):
        monkeypatch.setenv("SWINX_NATIVE_CFLAGS", flags)
        monkeypatch.setenv("SWINX_CACHE", str(tmp_path / (flags or "native")))
        native.reset()
        x, bias = qkv.clone().requires_grad_(), table.clone().requires_grad_()
        out = attention._native_attention(x, tokens, attention.pad_keys(bias), 32**-0.5)
        out.backward(grad)
        outs.append(out.detach().float())
        grads.append((x.grad.float(), bias.grad))
    native.reset()
    assert not torch.equal(outs[0], outs[1])
    assert max_diff(outs[0], outs[1]) < 2e-2 * outs[1].abs().max()
    for dot, inside in zip(grads[0], grads[1], strict=True):
        assert not torch.equal(dot, inside)
        assert max_diff(dot, inside) < 2e-2 * inside.abs().max()


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_takes_any_strides_and_thread_count(threads, dtype):
    """A contiguous (B, L, 3, heads, D) qkv and a view of one with other strides (q, k, v and heads
    interleaved otherwise, rows apart) give the same output and gradients, on any team size."""
    torch.manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        B, L, heads, N, D = 2, 4 * 49, 6, 49, 32
        base = torch.randn(B, heads, 3, L + 5, D, dtype=dtype, requires_grad=True)
        qkv = base[:, :, :, 5:].permute(0, 3, 2, 1, 4)  # (B, L, 3, heads, D)
        assert not qkv.is_contiguous() and qkv.stride(-1) == 1
        dense = qkv.detach().contiguous().requires_grad_()
        tokens, bias = torch.randperm(L), attention.pad_keys(torch.randn(1, heads, N, N))
        grad = torch.randn(B, L, heads * D, dtype=dtype)
        a = attention._native_attention(qkv, tokens, bias, 0.3)
        b = attention._native_attention(dense, tokens, bias, 0.3)
        assert max_diff(a, b) == 0
        a.backward(grad)
        b.backward(grad)
        assert max_diff(base.grad[:, :, :, 5:].permute(0, 3, 2, 1, 4), dense.grad) == 0
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_kernel_runs_on_pytorchs_thread_team():
    """One OpenMP runtime in the process: calling the kernel starts no threads of its own."""
    torch.set_num_threads(2)
    x = torch.randn(512, 512)
    (x @ x).sum()  # PyTorch's team is up
    tasks = len(os.listdir("/proc/self/task"))
    qkv = torch.randn(2, 4 * 49, 3, 3, 32)
    attention._native_attention(qkv, torch.arange(4 * 49), attention.pad_keys(torch.zeros(1, 3, 49, 49)), 0.2)
    assert len(os.listdir("/proc/self/task")) == tasks


@needs_kernels
@pytest.mark.parametrize("flush", [False, True])
def test_kernel_leaves_the_threads_denormal_setting_as_it_found_it(flush):
    """The kernels read and write denormals as zero while they run (a masked key's probability times a
    value falls below 1.2e-38, which Intel cores handle by a slow microcode assist); afterwards
    PyTorch's threads, the caller's and the team's, keep whatever setting they had (PyTorch's own
    flag covers the calling thread only)."""
    torch.set_num_threads(2)
    one, many = torch.full((64,), 1e-38), torch.full((1 << 17,), 1e-38)  # many: split over the team

    def flushed():  # which share of 1e-40 (a denormal) comes out as zero, in this thread and in the team
        return ((one * 0.01) == 0).float().mean().item(), ((many * 0.01) == 0).float().mean().item()

    if not torch.set_flush_denormal(flush):
        pytest.skip("PyTorch cannot flush denormals on this CPU (not x86 with SSE3)")
    try:
        (many * 2).sum()  # the team is up
        found = flushed()
        assert found[0] == (1.0 if flush else 0.0)
        qkv = torch.randn(2, 4 * 49, 3, 3, 32, requires_grad=True)
        bias = torch.zeros(4, 3, 49, 49)
        bias[..., 25:] = -100.0  # a shift mask: probabilities near exp(-87) and products below them
        attention._native_attention(qkv, torch.randperm(4 * 49), attention.pad_keys(bias), 0.2).sum().backward()
        assert qkv.grad.isfinite().all()
        assert flushed() == found
    finally:
        torch.set_flush_denormal(False)


def tiny(version: int = 1) -> SwinTransformer:
    torch.manual_seed(version)
    config = SwinConfig(
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
        num_classes=10,
        version=version,
        pretrained_window_sizes=(0, 0),
    )
    model = SwinTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@needs_kernels
@pytest.mark.parametrize("version", [1, 2])
def test_model_goes_through_the_kernel_and_agrees(version, monkeypatch):
    """Eager float32 inference and training call the kernel in every block (shifted ones included, at
    a size that pads); plain_ops() and the exact path do not; outputs and gradients agree."""
    calls = []
    kernel = attention._native_attention
    monkeypatch.setattr(attention, "_native_attention", lambda *a: calls.append(1) or kernel(*a))
    model = tiny(version)
    blocks = sum(model.config.depths)
    x = torch.randn(2, 3, 100, 132)
    with torch.inference_mode():
        fast = model(x)
    assert len(calls) == blocks
    with torch.inference_mode(), ops.plain_ops():
        plain = model(x)
    assert len(calls) == blocks
    assert max_diff(fast, plain) < 1e-5

    model.train()
    grads = {}
    for kernels in (True, False):
        model.zero_grad()
        torch.manual_seed(0)  # the same stochastic depth draws
        with contextlib.nullcontext() if kernels else ops.plain_ops():
            model(x).square().sum().backward()
        grads[kernels] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 2 * blocks
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for name, g in grads[True].items():
        assert max_diff(g, grads[False][name]) <= 1e-4 * max(1.0, grads[False][name].abs().max().item()), name


@needs_kernels
def test_the_built_library_is_reused_and_no_partial_file_is_left(fresh_build):
    assert native.library() is not None, native.reason()
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.library() is not None
    assert list(fresh_build.iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_without_a_compiler_the_model_runs_pytorchs_kernels(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.library() is None
    assert "no C compiler" in native.reason() and "/nonexistent/cc" in native.reason()
    model = tiny()
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        fused = model(x)
        model.set_fused_attn(False)
        exact = model(x)
    assert max_diff(fused, exact) < 1e-5


def test_a_failed_build_is_reported_and_leaves_nothing(fresh_build, monkeypatch, tmp_path):
    failing = tmp_path / "cc"
    failing.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\necho 'no such flag' >&2\nexit 1\n"
    )
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    assert native.library() is None
    assert "could not build" in native.reason() and "no such flag" in native.reason()
    assert not fresh_build.exists() or not list(fresh_build.iterdir())


def test_swinx_native_0_turns_the_kernels_off(fresh_build, monkeypatch):
    monkeypatch.setenv("SWINX_NATIVE", "0")
    assert native.library() is None and native.reason() == "SWINX_NATIVE=0"


@needs_kernels
@pytest.mark.parametrize("version", [1, 2])
def test_model_under_bfloat16_autocast_goes_through_the_kernel(version, monkeypatch):
    """Under CPU bfloat16 autocast the kernel runs in every block, inference and training, and agrees
    with PyTorch's attention under the same autocast within bfloat16's rounding."""
    calls = []
    kernel = attention._native_attention
    monkeypatch.setattr(attention, "_native_attention", lambda *a: calls.append(1) or kernel(*a))
    model = tiny(version)
    x = torch.randn(2, 3, 100, 132)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        fast = model(x).float()
        model.set_fused_attn(False)
        exact = model(x).float()
        model.set_fused_attn(True)
    assert len(calls) == sum(model.config.depths)
    assert max_diff(fast, exact) < 0.05 * exact.abs().max().item()
    model.train()
    with torch.autocast("cpu", torch.bfloat16):
        model(x).float().square().sum().backward()
    assert len(calls) == 2 * sum(model.config.depths)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@needs_kernels
@pytest.mark.parametrize("n", [1, 17, 4096 * 3 + 5])
def test_gelu_backward_kernel_matches_float64(n):
    """One pass for the lean MLP's backward: grad * GELU'(h) (over grad) and GELU(h), within float32's
    rounding of the float64 answers, at lengths that end mid-vector and mid-chunk, for h from -12 to 12
    (where erf saturates) and around 0."""
    torch.manual_seed(n)
    h = torch.cat([torch.linspace(-12, 12, 101), torch.randn(n) * 3, torch.randn(n) * 1e-3])
    grad = torch.randn_like(h)
    dh, act, _ = ops._gelu_backward(grad.clone(), h)
    exact_dh = torch.ops.aten.gelu_backward(grad.double(), h.double())
    exact_act = torch.nn.functional.gelu(h.double())
    assert max_diff(dh.double(), exact_dh) < 3e-6 and max_diff(act.double(), exact_act) < 3e-6
    out = grad.clone()
    assert ops._gelu_backward(out, h)[0] is out  # in place: the fresh gradient is reused
    strided = torch.randn(2 * h.numel())[::2]  # not contiguous: PyTorch's two passes
    dh2, act2, _ = ops._gelu_backward(grad.clone(), strided)
    torch.testing.assert_close(act2, torch.nn.functional.gelu(strided))


@needs_kernels
@pytest.mark.parametrize("rows, width, threads", [(1, 16, 1), (37, 384, 2), (5, 21, 2), (3, 7, 4)])
def test_gelu_backward_kernel_sums_the_bias_gradient(rows, width, threads, monkeypatch):
    """With `sums`, the same pass also adds grad * GELU'(h) over the rows (fc1's bias gradient): equal to
    the float64 sum for widths that end mid-vector and for more threads than rows."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(rows * width)
    h, grad = torch.randn(rows, width) * 3, torch.randn(rows, width)
    dh, act, dbias = ops._gelu_backward(grad.clone(), h, sums=True)
    exact_dh = torch.ops.aten.gelu_backward(grad.double(), h.double())
    assert max_diff(dh.double(), exact_dh) < 3e-6
    assert max_diff(act.double(), torch.nn.functional.gelu(h.double())) < 3e-6
    assert dbias.shape == (width,) and max_diff(dbias.double(), exact_dh.sum(0)) < 1e-5 * rows
    strided = torch.randn(rows, 2 * width)[:, ::2]  # PyTorch's passes, the same three results
    dh2, act2, dbias2 = ops._gelu_backward(grad.clone(), strided, sums=True)
    torch.testing.assert_close(dbias2, dh2.sum(0))


def _bf16_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 values lie between a and b (same sign), elementwise."""

    def ordinal(t):
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordinal(a) - ordinal(b)).abs()


@needs_kernels
@pytest.mark.parametrize("rows, width, threads", [(1, 1, 1), (3, 5, 4), (7, 16, 2), (37, 17, 2), (300, 96, 2),
                                                  (50, 768, 1), (9, 3072, 2)])  # fmt: skip
def test_layer_norm_kernel_is_the_float64_norm_rounded_once(rows, width, threads, monkeypatch):
    """bfloat16 rows, float32 weight and bias, bfloat16 out: the float64 norm of the same inputs rounded
    to bfloat16, give or take one bfloat16 step, for widths that end mid-vector, rows whose mean is
    far from 0, more threads than rows; and PyTorch's mixed-type norm but for rare last-bit
    differences."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(rows * width)
    norm = torch.nn.LayerNorm(width, eps=1e-3 if width == 17 else 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(rows, width) * 3 + torch.randn(rows, 1) * 20).bfloat16()
    with torch.inference_mode():
        ours = ops.layer_norm(x, norm)
        theirs = norm(x)
    exact = torch.nn.functional.layer_norm(x.double(), (width,), norm.weight.double(), norm.bias.double(), norm.eps)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == x.shape
    assert _bf16_steps_apart(ours, exact.bfloat16()).max() <= 1
    differing = (ours != theirs).float().mean().item()
    assert differing < 0.01 and max_diff(ours.float(), theirs.float()) <= 2**-7 * exact.abs().max().item()


@needs_kernels
def test_layer_norm_kernel_runs_only_where_it_returns_what_the_norm_would(monkeypatch):
    """The C norm takes eager bfloat16 code on contiguous maps (inference, and training through its own
    backward); float32 inputs, strided maps, plain_ops, fast=False and norms without an affine part go
    to nn.LayerNorm itself."""
    calls = []
    lib = native.library()
    monkeypatch.setattr(native, "library", lambda: _Counting(lib, calls))
    norm = torch.nn.LayerNorm(32)
    x = torch.randn(2, 6, 5, 32).bfloat16()
    with torch.inference_mode():
        ops.layer_norm(x, norm)
        assert len(calls) == 1
        ops.layer_norm(x.float(), norm)
        ops.layer_norm(x.transpose(1, 2), norm)
        ops.layer_norm(x, torch.nn.LayerNorm(32, elementwise_affine=False))
        with ops.plain_ops():
            ops.layer_norm(x, norm)
        ops.layer_norm(x, norm, fast=False)
    assert len(calls) == 1
    out = ops.layer_norm(x, norm)  # grad mode, parameters that need a gradient
    assert calls == ["swinx_layer_norm_bf16"] * 2 and "LayerNormBf16" in type(out.grad_fn).__name__


class _Counting:
    """The kernels' library, counting calls to the norm."""

    def __init__(self, lib, calls):
        self.lib, self.calls = lib, calls

    def __getattr__(self, name):
        if name.startswith("swinx_layer_norm_bf16"):
            self.calls.append(name)
        return getattr(self.lib, name)


@needs_kernels
@pytest.mark.parametrize("version", [1, 2])
def test_model_under_bfloat16_autocast_norms_through_the_kernel(version, monkeypatch):
    """bf16 autocast inference: every block's and merge's norm and the final one through the C norm,
    the logits within bfloat16 rounding of those with PyTorch's norms."""
    calls = []
    lib = native.library()
    model = tiny(version)
    x = torch.randn(2, 3, 100, 132)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        with monkeypatch.context() as m:
            m.setattr(ops, "_norm_takes", lambda x, norm: False)
            plain = model(x).float()
        monkeypatch.setattr(native, "library", lambda: _Counting(lib, calls))
        fast = model(x).float()
    blocks, merges = sum(model.config.depths), len(model.config.depths) - 1
    assert len(calls) == 2 * blocks + merges + 1
    assert max_diff(fast, plain) < 0.02 * plain.abs().max().item()


@needs_kernels
@pytest.mark.parametrize("rows, width, threads", [(1, 1, 1), (3, 5, 4), (37, 17, 2), (300, 96, 2), (9, 3072, 2)])
def test_layer_norm_kernel_gradients_match_float64(rows, width, threads, monkeypatch):
    """Training through the C norm: the output as in inference, the input gradient within bfloat16's
    rounding of the float64 one, the weight and bias gradients (float32 sums over the rows, per
    thread) within float32's; with the parameters frozen or the input constant, only what is asked."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(rows + width)
    norm = torch.nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(rows, width) * 2 + 5).bfloat16().requires_grad_()
    dy = torch.randn(rows, width).bfloat16()
    out = ops.layer_norm(x, norm)
    assert out.dtype == torch.bfloat16 and out.grad_fn is not None and "LayerNormBf16" in type(out.grad_fn).__name__
    out.backward(dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias))
    exact = torch.nn.functional.layer_norm(xd, (width,), wd, bd, norm.eps)
    exact.backward(dy.double())
    assert _bf16_steps_apart(out, exact.bfloat16()).max() <= 1
    assert max_diff(x.grad.double(), xd.grad) <= 2**-7 * xd.grad.abs().max().item() + 1e-6
    assert max_diff(norm.weight.grad.double(), wd.grad) < 1e-5 * (1 + wd.grad.abs().max().item())
    assert max_diff(norm.bias.grad.double(), bd.grad) < 1e-5 * (1 + bd.grad.abs().max().item())
    frozen = torch.nn.LayerNorm(width).requires_grad_(False)
    x.grad = None
    ops.layer_norm(x, frozen).backward(dy)
    assert x.grad is not None and frozen.weight.grad is None
    constant = x.detach()
    norm.zero_grad()
    ops.layer_norm(constant, norm).backward(dy)
    torch.testing.assert_close(norm.bias.grad, dy.float().sum(0), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_model_trains_under_bfloat16_autocast_through_the_norm_kernel(monkeypatch):
    """A bf16 autocast training step: every norm but the patch embedding's (a strided map) through the
    C norm and its backward, and the loss and gradients no further from float32's than with PyTorch's
    norms under the same autocast."""
    model = tiny(1).train()
    x = torch.randn(2, 3, 100, 132)

    def gradients(autocast=True):
        torch.manual_seed(0)  # the same stochastic depth draws
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().mean()
        loss.backward()
        return loss.detach().double(), torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    exact_loss, exact = gradients(autocast=False)
    with monkeypatch.context() as m:
        m.setattr(ops, "_norm_takes", lambda x, norm: False)
        plain_loss, plain = gradients()
    calls = []
    lib = native.library()
    monkeypatch.setattr(native, "library", lambda: _Counting(lib, calls))
    loss, fast = gradients()
    blocks, merges = sum(model.config.depths), len(model.config.depths) - 1
    assert calls.count("swinx_layer_norm_bf16") == calls.count("swinx_layer_norm_bf16_backward")
    assert calls.count("swinx_layer_norm_bf16") == 2 * blocks + merges + 1
    assert abs(loss - exact_loss) <= 1.5 * abs(plain_loss - exact_loss) + 1e-3 * exact_loss
    assert max_diff(fast, exact) <= max_diff(plain, exact)  # 6x closer here: PyTorch's bf16 weight gradient is lossier
