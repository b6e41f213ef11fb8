"""Fast kernels chosen at run time, each beside the plain PyTorch op it replaces.

On x86 CPUs PyTorch ships oneDNN, whose linear kernel runs Swin's matrix shapes about twice
as fast as the default `addmm` (BLAS) and can apply GELU in the same pass. PyTorch gives it
no backward, so training goes through `OneDNNLinear`, an autograd function whose forward and
input gradient use oneDNN and whose weight gradient uses BLAS (faster for the tall, thin
products of the weight gradient), for each shape where oneDNN is timed faster than BLAS on
this host (`_onednn_trains_faster`; on an AVX-512 host where MKL is as fast, F.linear trains
faster). Training under bfloat16 autocast keeps F.linear, which autocast
already sends to oneDNN's bf16 matmul with its native backward. Everything is skipped under
torch.compile and tracing, where the compiler picks kernels itself.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_enabled = True


@contextlib.contextmanager
def plain_ops():
    """Run every `linear` as F.linear inside this block (e.g. for torch.utils.flop_counter)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _onednn_usable(x: torch.Tensor) -> bool:
    return (
        _enabled
        and HAS_ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


_DTYPES = (torch.float32, torch.bfloat16)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post_op: str = "none") -> torch.Tensor:
    """x @ weight.T + bias (then GELU when post_op == "gelu"), any leading dims."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], "none" if post_op == "gelu" else "")


class OneDNNLinear(torch.autograd.Function):
    """F.linear with oneDNN for the output and the input gradient, BLAS for the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])  # (M, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(grad2d, weight, onednn=True).view(x.shape)  # (M, in)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(grad2d.t(), x.reshape(-1, x.shape[-1]))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False, fast: bool = True
) -> torch.Tensor:
    """F.linear (then exact erf GELU when `gelu`), through oneDNN on the CPU where it is available."""
    if not (fast and _onednn_usable(x)):
        return _plain(x, weight, bias, gelu)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if torch.is_autocast_enabled("cpu"):  # do what autocast would have done for F.linear
        if training:  # autocast's F.linear is oneDNN's bf16 matmul already, with a native backward
            return _plain(x, weight, bias, gelu)
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return _plain(x, weight, bias, gelu)
    elif training and not _onednn_trains_faster(x, weight):
        return _plain(x, weight, bias, gelu)
    if not training:
        return _onednn(x, weight, bias, "gelu" if gelu else "none")
    with torch.autocast("cpu", enabled=False):
        y = OneDNNLinear.apply(x, weight, bias)
    return F.gelu(y) if gelu else y


_TRAIN_CHOICE: dict[tuple, bool] = {}  # (rows, in, out, dtype) -> oneDNN was faster than BLAS


def _onednn_trains_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN beats BLAS for this product, timed once per shape. On some hosts oneDNN runs
    Swin's float32 shapes twice as fast as BLAS; on others (AVX-512 hosts where MKL is as good) it
    is slower, and training through `OneDNNLinear` then loses to plain F.linear."""
    key = (x.numel() // x.shape[-1], weight.shape[1], weight.shape[0], x.dtype)
    choice = _TRAIN_CHOICE.get(key)
    if choice is None:
        with torch.no_grad():
            rows, w = x.detach().reshape(-1, x.shape[-1]), weight.detach()
            onednn = best_seconds(lambda: _onednn(rows, w, None))
            blas = best_seconds(lambda: F.linear(rows, w))
        choice = _TRAIN_CHOICE[key] = onednn < 0.95 * blas
    return choice


def best_seconds(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` calls of `fn`, after one warm-up (for choosing between kernels)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _plain(x, weight, bias, gelu):
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


# ---------------------------------------------------------------------------------------------
# The MLP for training: activations saved once, the cheap parts recomputed


def mlp_trains_lean(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether `lean_mlp` applies: autograd in one dtype outside autocast, compilers and tracing (which
    pick what to save themselves), with fast kernels enabled."""
    return (
        _enabled
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, *params))
        and not torch.is_autocast_enabled(x.device.type)
        and all(t is None or t.dtype == x.dtype for t in params)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def lean_mlp(x, norm_weight, norm_bias, eps, w1, b1, w2, b2) -> torch.Tensor:
    """fc2(GELU(fc1(LayerNorm(x)))) (no norm when `norm_weight` is None) that saves only x and fc1's
    output for the backward. Autograd would also keep the norm's output (for fc1's weight gradient)
    and the GELU's output (for fc2's, 4x the width): over a quarter of a V1 block's saved activations.
    Both are recomputed in the backward, an elementwise pass each against three matrix products."""
    return _LeanMlp.apply(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)


class _LeanMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
        rows = x.reshape(-1, x.shape[-1])
        mean = rstd = None
        if norm_weight is not None:
            normed, mean, rstd = torch.native_layer_norm(rows, rows.shape[-1:], norm_weight, norm_bias, eps)
        else:
            normed = rows
        ctx.onednn = []  # per layer: whether its forward went through oneDNN (the backward follows)
        hidden = _train_forward(ctx, normed, w1, b1)
        out = _train_forward(ctx, F.gelu(hidden), w2, b2)
        ctx.save_for_backward(rows, mean, rstd, norm_weight, norm_bias, w1, hidden, w2)
        ctx.eps, ctx.has_b1, ctx.has_b2, ctx.in_shape = eps, b1 is not None, b2 is not None, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, mean, rstd, norm_weight, norm_bias, w1, hidden, w2 = ctx.saved_tensors
        needs = ctx.needs_input_grad  # x, norm_weight, norm_bias, eps, w1, b1, w2, b2
        grad = grad.reshape(-1, grad.shape[-1])
        grads = [None] * 8
        if needs[6]:
            grads[6] = grad.t().mm(F.gelu(hidden))
        if ctx.has_b2 and needs[7]:
            grads[7] = grad.sum(0)
        grad = torch.ops.aten.gelu_backward(_grad_input(grad, w2, ctx.onednn[1]), hidden)
        del hidden
        if norm_weight is not None:
            normed = torch.native_layer_norm(rows, rows.shape[-1:], norm_weight, norm_bias, ctx.eps)[0]
        else:
            normed = rows
        if needs[4]:
            grads[4] = grad.t().mm(normed)
        if ctx.has_b1 and needs[5]:
            grads[5] = grad.sum(0)
        del normed
        if needs[0] or needs[1] or needs[2]:
            grad = _grad_input(grad, w1, ctx.onednn[0])
            if norm_weight is not None:
                wanted = [needs[0], needs[1], needs[2]]
                grad, grads[1], grads[2] = torch.ops.aten.native_layer_norm_backward(
                    grad, rows, rows.shape[-1:], mean, rstd, norm_weight, norm_bias, wanted
                )
            grads[0] = grad.view(ctx.in_shape) if needs[0] else None
        return tuple(grads)


def _train_forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ weight.T + bias with the kernel `_onednn_trains_faster` picks for this shape, noted in ctx."""
    ctx.onednn.append(_onednn_usable(rows) and _onednn_trains_faster(rows, weight))
    return _onednn(rows, weight, bias) if ctx.onednn[-1] else F.linear(rows, weight, bias)


def _grad_input(grad: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    """grad @ weight: through oneDNN for a layer whose forward went through it, else BLAS."""
    return _onednn(grad, weight.t().contiguous(), None) if onednn else grad.mm(weight)
