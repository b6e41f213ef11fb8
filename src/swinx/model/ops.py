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
import functools
import sys
import time

import torch
import torch.nn.functional as F

from swinx.model import native

HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_enabled = True


@contextlib.contextmanager
def plain_ops():
    """Run every `linear` as F.linear, and attention through PyTorch's ops rather than swinx's C
    kernel, inside this block (e.g. for torch.utils.flop_counter)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def native_enabled() -> bool:
    """False inside `plain_ops()`: swinx's C kernels (`swinx.model.native`) stay out too."""
    return _enabled


def _kernels_take(x: torch.Tensor) -> bool:
    """Whether our oneDNN kernels can take `x` at all: enabled, available, a CPU tensor of their dtypes."""
    return _enabled and HAS_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype in _DTYPES


def _onednn_usable(x: torch.Tensor) -> bool:
    """Eager code: our kernels called directly."""
    return _kernels_take(x) and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


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
        needs = ctx.needs_input_grad
        return tuple(_linear_grads(grad, x, weight, True, (needs[0], needs[1], ctx.has_bias and needs[2])))


def _linear_grads(grad, x, weight, onednn: bool, needs) -> list[torch.Tensor | None]:
    """The gradients of x @ weight.T + b that `needs` (x, weight, b) asks for; the input gradient
    through oneDNN where the forward went through it."""
    grad2d = grad.reshape(-1, grad.shape[-1])  # (M, out)
    grads = [None, None, None]
    if needs[0]:
        grads[0] = _grad_input(grad2d, weight, onednn).view(x.shape)  # (M, in)
    if needs[1]:
        grads[1] = _weight_grad(grad2d, x.reshape(-1, x.shape[-1]))  # (out, in)
    if needs[2]:
        grads[2] = grad2d.sum(0)
    return grads


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False, fast: bool = True
) -> torch.Tensor:
    """F.linear (then exact erf GELU when `gelu`), through oneDNN on the CPU where it is available."""
    compiling = _compiling_with_our_kernels(x)
    if not (fast and (compiling or _onednn_usable(x))):
        return _plain(x, weight, bias, gelu)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if torch.is_autocast_enabled("cpu"):  # do what autocast would have done for F.linear
        if training or compiling:  # autocast's F.linear is oneDNN's bf16 matmul already, with a native backward
            return _plain(x, weight, bias, gelu)
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return _plain(x, weight, bias, gelu)
    if compiling:  # opaque ops that pick the kernel at run time, on the real tensors
        if not training:
            return torch.ops.swinx.linear(x, weight, bias, gelu)
        y = torch.ops.swinx.train_linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    if not training:
        return _onednn(x, weight, bias, "gelu" if gelu else "none")
    if not _onednn_trains_faster(x, weight):
        return _plain(x, weight, bias, gelu)
    y = OneDNNLinear.apply(x, weight, bias)
    return F.gelu(y) if gelu else y


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, fast: bool = True) -> torch.Tensor:
    """norm(x); for bfloat16 on the CPU (the residual stream under bf16 autocast), inference and
    training, by swinx's C kernels (csrc/layer_norm.c): one read of each row from memory each way,
    1.4-1.6x PyTorch's forward on Swin's widths (AMD EPYC Zen 4, 2 threads), the same float32
    arithmetic up to its last bits before the one rounding to bfloat16 (3e-5 of the values come out
    one bfloat16 step apart)."""
    if not (fast and _norm_takes(x, norm)):
        return norm(x)
    weight, bias = norm.weight, norm.bias
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _LayerNormBf16.apply(x, weight, bias, norm.eps)
    return _layer_norm_forward(x, weight, bias, norm.eps, None, None)


def _layer_norm_forward(x, weight, bias, eps, mean, rstd) -> torch.Tensor:
    """The C norm's bfloat16 output; each row's mean and rstd written into `mean` and `rstd` unless None."""
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    native.library().swinx_layer_norm_bf16(
        x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), None if mean is None else mean.data_ptr(),
        None if rstd is None else rstd.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


_LANES = 16  # csrc/vector.h's vector width: the backward's per-thread sums are padded to whole vectors


class _LayerNormBf16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows = x.numel() // x.shape[-1]
        mean, rstd = torch.empty(rows), torch.empty(rows)
        out = _layer_norm_forward(x, weight, bias, eps, mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous()
        rows, width, threads = x.numel() // x.shape[-1], x.shape[-1], torch.get_num_threads()
        dx = torch.empty(x.shape, dtype=torch.bfloat16)
        params = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        partial = torch.zeros(threads, 2, -(-width // _LANES) * _LANES) if params else None
        native.library().swinx_layer_norm_bf16_backward(
            grad.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
            partial.data_ptr() if params else None, rows, width, threads,
        )  # fmt: skip
        sums = partial[:, :, :width].sum(0) if params else (None, None)
        return dx if ctx.needs_input_grad[0] else None, sums[0], sums[1], None


def _norm_takes(x: torch.Tensor, norm: torch.nn.LayerNorm) -> bool:
    """Whether `layer_norm` runs the C kernels: eager CPU code on a contiguous bfloat16 x, an affine
    norm over the last dimension with contiguous float32 parameters (PyTorch's mixed-type norm then
    returns bfloat16 too), and swinx's C kernels built."""
    weight, bias = norm.weight, norm.bias
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.is_contiguous()
        and x.numel() > 0
        and weight is not None
        and bias is not None
        and len(norm.normalized_shape) == 1
        and weight.dtype == bias.dtype == torch.float32
        and weight.is_contiguous()
        and bias.is_contiguous()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and native.library() is not None
    )


_TRAIN_CHOICE: dict[tuple, bool] = {}  # (rows, in, out, dtype) -> oneDNN was faster than BLAS


def _onednn_trains_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN beats BLAS for this layer's forward and input-gradient products together, timed
    once per shape (the weight gradient is BLAS's either way). On some hosts oneDNN runs Swin's
    float32 shapes twice as fast as BLAS; on others (AVX-512 hosts where MKL is as good) it is
    slower, and training through `OneDNNLinear` then loses to plain F.linear. On an AMD EPYC (Zen 4)
    oneDNN's forward was within 5% of BLAS for three of stage 1's four products and its input gradient
    up to 30% faster, so both are timed."""
    key = (x.numel() // x.shape[-1], weight.shape[1], weight.shape[0], x.dtype)
    choice = _TRAIN_CHOICE.get(key)
    if choice is None:
        with torch.no_grad():
            rows, w = x.detach().reshape(-1, x.shape[-1]), weight.detach()
            wt, grad = w.t(), F.linear(rows, w)  # the output stands in for its gradient
            onednn = best_seconds(lambda: (_onednn(rows, w, None), _onednn(grad, wt, None)))
            blas = best_seconds(lambda: (F.linear(rows, w), grad.mm(w)))
        choice = _TRAIN_CHOICE[key] = onednn < 0.95 * blas
    return choice


_WGRAD_CHOICE: dict[tuple, bool] = {}  # (rows, in, out, dtype) -> x^T grad, transposed, beat grad^T x


def _weight_grad(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad^T @ rows, the (out, in) weight gradient of a linear layer from (M, out) and (M, in), in the
    orientation that BLAS runs faster for this shape (timed once per shape): computed as
    (rows^T @ grad)^T it was 1.1-1.3x faster where in > out (an MLP's fc2) on an AMD EPYC (Zen 4)."""
    key = (rows.shape[0], rows.shape[1], grad.shape[1], rows.dtype)
    choice = _WGRAD_CHOICE.get(key)
    if choice is None:
        direct = best_seconds(lambda: grad.t().mm(rows))
        transposed = best_seconds(lambda: rows.t().mm(grad))
        choice = _WGRAD_CHOICE[key] = transposed < 0.95 * direct
    return rows.t().mm(grad).t().contiguous() if choice else grad.t().mm(rows)


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
    """Whether `lean_mlp` applies: autograd in one dtype outside autocast and tracing, with fast kernels
    enabled; under torch.compile only where our kernels go into the graph (`_compiling_with_our_kernels`)."""
    return (
        _enabled
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, *params))
        and not torch.is_autocast_enabled(x.device.type)
        and all(t is None or t.dtype == x.dtype for t in params)
        and (not torch.compiler.is_compiling() or _compiling_with_our_kernels(x))
        and not torch.jit.is_tracing()
    )


def lean_mlp(x, norm_weight, norm_bias, eps, w1, b1, w2, b2) -> torch.Tensor:
    """fc2(GELU(fc1(LayerNorm(x)))) (no norm when `norm_weight` is None) that saves only x and fc1's
    output for the backward. Autograd would also keep the norm's output (for fc1's weight gradient)
    and the GELU's output (for fc2's, 4x the width): over a quarter of a V1 block's saved activations.
    Both are recomputed in the backward, an elementwise pass each against three matrix products."""
    if _compiling_with_our_kernels(x):
        return torch.ops.swinx.lean_mlp(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)[0]
    return _LeanMlp.apply(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)


class _LeanMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
        out, hidden, mean, rstd, ctx.onednn = _lean_forward(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w1, hidden, w2)
        ctx.eps, ctx.has_b1, ctx.has_b2 = eps, b1 is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, norm_weight, norm_bias, w1, hidden, w2 = ctx.saved_tensors
        needs = list(ctx.needs_input_grad)  # x, norm_weight, norm_bias, eps, w1, b1, w2, b2
        needs[5], needs[7] = ctx.has_b1 and needs[5], ctx.has_b2 and needs[7]
        grads = _lean_backward(grad, x, mean, rstd, norm_weight, norm_bias, ctx.eps, w1, hidden, w2, ctx.onednn, needs)
        return tuple(grads)


def _lean_forward(x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
    """The lean MLP's output, what its backward needs (fc1's output, the norm's mean and rstd, or
    None without a norm) and, per layer, whether it went through oneDNN."""
    rows = x.reshape(-1, x.shape[-1])
    mean = rstd = None
    if norm_weight is not None:
        normed, mean, rstd = torch.native_layer_norm(rows, rows.shape[-1:], norm_weight, norm_bias, eps)
    else:
        normed = rows
    onednn = [_trains_onednn(normed, w1), False]
    hidden = _onednn(normed, w1, b1) if onednn[0] else F.linear(normed, w1, b1)
    del normed
    activated = F.gelu(hidden)
    onednn[1] = _trains_onednn(activated, w2)
    out = _onednn(activated, w2, b2) if onednn[1] else F.linear(activated, w2, b2)
    return out.view(*x.shape[:-1], out.shape[-1]), hidden, mean, rstd, onednn


def _lean_backward(grad, x, mean, rstd, norm_weight, norm_bias, eps, w1, hidden, w2, onednn, needs) -> list:
    """The gradients `needs` asks for (x, norm_weight, norm_bias, eps, w1, b1, w2, b2), the norm's
    output and GELU's recomputed."""
    rows = x.reshape(-1, x.shape[-1])
    grad = grad.reshape(-1, grad.shape[-1])
    grads = [None] * 8
    dhidden, activated, dbias = _gelu_backward(_grad_input(grad, w2, onednn[1]), hidden, needs[5])
    del hidden
    if needs[6]:
        grads[6] = _weight_grad(grad, activated)
    del activated
    if needs[7]:
        grads[7] = grad.sum(0)
    grad = dhidden
    if norm_weight is not None:
        normed = torch.native_layer_norm(rows, rows.shape[-1:], norm_weight, norm_bias, eps)[0]
    else:
        normed = rows
    if needs[4]:
        grads[4] = _weight_grad(grad, normed)
    if needs[5]:
        grads[5] = dbias if dbias is not None else grad.sum(0)
    del normed
    if needs[0] or needs[1] or needs[2]:
        grad = _grad_input(grad, w1, onednn[0])
        if norm_weight is not None:
            grad, grads[1], grads[2] = torch.ops.aten.native_layer_norm_backward(
                grad, rows, rows.shape[-1:], mean, rstd, norm_weight, norm_bias, list(needs[:3])
            )
        grads[0] = grad.view(x.shape) if needs[0] else None
    return grads


def _gelu_backward(grad: torch.Tensor, hidden: torch.Tensor, sums: bool = False) -> tuple:
    """(grad * GELU'(hidden), GELU(hidden), and with `sums` the first one's column sums, fc1's bias
    gradient, else None) for a fresh (rows, width) `grad`: swinx's C kernel in one pass (float32 on the
    CPU; `grad` overwritten), else PyTorch's gelu_backward and gelu."""
    lib = native.library() if _enabled and hidden.device.type == "cpu" else None
    same = grad.dtype == hidden.dtype == torch.float32 and grad.shape == hidden.shape
    if lib is not None and same and grad.is_contiguous() and hidden.is_contiguous():
        activated, threads = torch.empty_like(hidden), torch.get_num_threads()
        pointers = hidden.data_ptr(), grad.data_ptr(), activated.data_ptr()
        if not sums:
            lib.swinx_gelu_backward(*pointers, hidden.numel(), threads)
            return grad, activated, None
        partial = torch.zeros(threads, hidden.shape[-1])
        lib.swinx_gelu_backward_sums(*pointers, hidden.numel() // hidden.shape[-1], hidden.shape[-1],
                                     partial.data_ptr(), threads)  # fmt: skip
        return grad, activated, partial.sum(0)
    dhidden = torch.ops.aten.gelu_backward(grad, hidden)
    return dhidden, F.gelu(hidden), dhidden.sum(0) if sums else None


def _trains_onednn(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a training product takes oneDNN: where it is usable and timed faster for this shape."""
    return _onednn_usable(rows) and _onednn_trains_faster(rows, weight)


def _grad_input(grad: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    """grad @ weight: through oneDNN for a layer whose forward went through it, else BLAS."""
    return _onednn(grad, weight.t(), None) if onednn else grad.mm(weight)  # oneDNN reads the strided view


# ---------------------------------------------------------------------------------------------
# Under torch.compile: the same kernels, as operators the compiler keeps
#
# Traced by torch.compile, every linear would become BLAS's addmm, and the lean MLP's autograd
# function would be traced through and lost. These custom operators keep them: the compiler sees
# each as one opaque call with a known output shape (the `register_fake` functions) and fuses the
# elementwise work around it, and at run time each one runs the eager kernels above, choosing between
# oneDNN and BLAS on the real tensors as eager training does. Exported and traced graphs (ONNX,
# torch.export, TorchScript) keep plain ATen ops. Inference under inductor's freezing packs the
# weights for a GEMM of its own (MKL's on x86), and keeps plain ATen ops where that GEMM is the
# faster one on this host (`_onednn_beats_frozen_gemm`).


def _compiling_with_our_kernels(x: torch.Tensor) -> bool:
    return _kernels_take(x) and _compiler_keeps_our_ops()


def _compiler_keeps_our_ops() -> bool:
    """Compiling with torch.compile, not exporting or tracing; under inductor's freezing (inference),
    only where oneDNN beats the prepacked GEMM that freezing would use instead."""
    return (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()
        and not (_inductor_freezes() and not torch.is_grad_enabled() and not _onednn_beats_frozen_gemm())
    )


def _inductor_freezes() -> bool:
    inductor_config = sys.modules.get("torch._inductor.config")
    return bool(inductor_config is not None and inductor_config.freezing)


_FROZEN_CHOICE: list[bool] = []  # the answer of `_onednn_beats_frozen_gemm`, once per process

# float32 products of swin_t at batch 8: stage 2's fc1 and stage 3's fc2 (rows, in, out)
_FROZEN_PROBE_SHAPES = ((6272, 192, 768), (1568, 1536, 384))


@torch.compiler.assume_constant_result
def _onednn_beats_frozen_gemm() -> bool:
    """Whether our oneDNN linear runs float32 faster than the GEMM inductor's freezing would put in
    its place: MKL's prepacked sgemm on x86 builds with MKL (else BLAS's addmm). Timed once per
    process, on two of Swin's shapes. On an AMD EPYC (Zen 4) MKL's is the slower one (187-199 against
    207-215 GFLOP/s) and frozen graphs keep ours; on an Intel Xeon with AMX, where MKL's dense float32
    rate was the higher, freezing is expected to keep its own (the probe was not run there)."""
    if not _FROZEN_CHOICE:
        ours = theirs = 0.0
        with torch.no_grad():
            for rows, cin, cout in _FROZEN_PROBE_SHAPES:
                x, w = torch.randn(rows, cin), torch.randn(cout, cin) / cin**0.5
                ours += best_seconds(lambda: _onednn(x, w, None), repeats=5)
                if torch._C.has_mkl:
                    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
                    theirs += best_seconds(lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, rows), repeats=5)
                else:
                    theirs += best_seconds(lambda: F.linear(x, w), repeats=5)
        _FROZEN_CHOICE.append(ours < theirs)
    return _FROZEN_CHOICE[0]


def _none_to_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t  # an operator returns tensors, never None


@torch.library.custom_op("swinx::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return _onednn(x, weight, bias, "gelu" if gelu else "none")


@_linear_op.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("swinx::train_linear", mutates_args=())
def _train_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn(x, weight, bias) if _trains_onednn(x, weight) else F.linear(x, weight, bias)


@_train_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("swinx::train_linear_grads", mutates_args=())
def _train_linear_grads_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _linear_grads(grad, x, weight, _trains_onednn(x, weight), needs)
    return tuple(_none_to_empty(g, grad) for g in grads)


@_train_linear_grads_op.register_fake
def _(grad, x, weight, needs):
    shapes = (x.shape, weight.shape, grad.shape[-1:])
    return tuple(grad.new_empty(shape if wanted else (0,)) for shape, wanted in zip(shapes, needs))


def _setup_train_linear(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward_train_linear(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = [*ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = torch.ops.swinx.train_linear_grads(grad, x, weight, needs)
    return tuple(g if wanted else None for g, wanted in zip(grads, needs))


_train_linear_op.register_autograd(_backward_train_linear, setup_context=_setup_train_linear)


@torch.library.custom_op("swinx::lean_mlp", mutates_args=())
def _lean_mlp_op(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lean MLP's output, then what its backward needs: fc1's output, the norm's mean and rstd."""
    out, hidden, mean, rstd, _ = _lean_forward(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)
    return out, hidden, _none_to_empty(mean, x), _none_to_empty(rstd, x)


@_lean_mlp_op.register_fake
def _(x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
    rows = x.numel() // x.shape[-1]
    stats = (rows, 1) if norm_weight is not None else (0,)
    return (
        x.new_empty((*x.shape[:-1], w2.shape[0])),
        x.new_empty((rows, w1.shape[0])),
        x.new_empty(stats),
        x.new_empty(stats),
    )


@torch.library.custom_op("swinx::lean_mlp_grads", mutates_args=())
def _lean_mlp_grads_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    w1: torch.Tensor,
    hidden: torch.Tensor,
    w2: torch.Tensor,
    needs: list[bool],
) -> list[torch.Tensor]:
    """The gradients of x, norm_weight, norm_bias, w1, b1, w2, b2 (empty where not needed)."""
    onednn = [_trains_onednn(x, w1), _trains_onednn(hidden, w2)]  # the forward's choices, remembered per shape
    grads = _lean_backward(grad, x, mean, rstd, norm_weight, norm_bias, eps, w1, hidden, w2, onednn, needs)
    return [_none_to_empty(g, grad) for i, g in enumerate(grads) if i != 3]


@_lean_mlp_grads_op.register_fake
def _(grad, x, mean, rstd, norm_weight, norm_bias, eps, w1, hidden, w2, needs):
    C, H = x.shape[-1], hidden.shape[-1]
    shapes = (x.shape, (C,), (C,), None, (H, C), (H,), (C, H), (C,))
    return [grad.new_empty(shape if needs[i] else (0,)) for i, shape in enumerate(shapes) if i != 3]


def _setup_lean_mlp(ctx, inputs, output):
    x, norm_weight, norm_bias, eps, w1, b1, w2, b2 = inputs
    _, hidden, mean, rstd = output
    ctx.mark_non_differentiable(hidden, mean, rstd)
    ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w1, hidden, w2)
    ctx.eps, ctx.has_b1, ctx.has_b2 = eps, b1 is not None, b2 is not None


def _backward_lean_mlp(ctx, grad, *_unused):
    x, mean, rstd, norm_weight, norm_bias, w1, hidden, w2 = ctx.saved_tensors
    needs = list(ctx.needs_input_grad)
    needs[3], needs[5], needs[7] = False, ctx.has_b1 and needs[5], ctx.has_b2 and needs[7]
    grads = torch.ops.swinx.lean_mlp_grads(grad, x, mean, rstd, norm_weight, norm_bias, ctx.eps, w1, hidden, w2, needs)
    grads.insert(3, None)  # eps
    return tuple(g if wanted else None for g, wanted in zip(grads, needs))


_lean_mlp_op.register_autograd(_backward_lean_mlp, setup_context=_setup_lean_mlp)


def materialized(t: torch.Tensor) -> torch.Tensor:
    """`t`, computed into memory of its own where torch.compile would recompute it inside each consumer.

    Inductor inlines cheap pointwise producers into the kernels that read them. For the attention
    bias that is a loss: the position-bias gather and the shift mask's region arithmetic were
    recomputed for every batch element inside the softmax kernel, with scalar loads, instead of
    being built once per step and broadcast. An opaque copy stops that; it costs one pass over the
    (nW, heads, N, N) bias. Eager code, tracing, export and inference under inductor's freezing
    where freezing keeps its own GEMMs (it folds the bias into a constant, once) get `t` itself.
    """
    return torch.ops.swinx.materialize(t) if _compiler_keeps_our_ops() else t


@torch.library.custom_op("swinx::materialize", mutates_args=())
def _materialize_op(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


@_materialize_op.register_fake
def _(t):
    return torch.empty_like(t)


_materialize_op.register_autograd(lambda ctx, grad: grad, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# Bilinear resizing as two small matrix products
#
# F.interpolate's bilinear kernel on CPUs costs a few nanoseconds per output element forward and
# more backward (a scalar scatter-add), in bfloat16 more than in float32. Bilinear interpolation is
# separable: out = A_h @ x @ A_w^T, with A (out, in) holding each output position's two weights.
# For a small input the two products (2 x input side multiply-adds per output element, dense
# zeros included) run at GEMM speed and their backward is two more products: a UperNet's decoder
# upsamples stride-32..8 maps to stride 4 and its logits to the image, all from sides of 6 to 64.
# Computed in float32 and rounded once to the input's dtype, as PyTorch's kernel does.

RESIZE_MAX_SIDE = 64  # input sides up to this take the products (crossover ~96 on an AMD EPYC Zen 4, 2 cores)


def bilinear_resize(x: torch.Tensor, size) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=False) for (N, C, h, w) `x`; the same
    numbers (float32 sums in another order), faster on CPUs for inputs of side <= RESIZE_MAX_SIDE."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if not _resizes_by_products(x, size):  # sizes stay as given: a traced graph keeps them symbolic
        return F.interpolate(x, size, mode="bilinear", align_corners=False)
    size = (int(size[0]), int(size[1]))
    rows, cols = _bilinear_matrix(x.shape[-2], size[0]), _bilinear_matrix(x.shape[-1], size[1])
    with torch.autocast("cpu", enabled=False):
        return torch.matmul(rows, torch.matmul(x.float(), cols.t())).to(x.dtype)


def _resizes_by_products(x: torch.Tensor, size) -> bool:
    return (  # traced and compiled graphs keep the plain op (an ONNX Resize, inductor's own lowering)
        _enabled
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and max(x.shape[-2:]) <= RESIZE_MAX_SIDE
        and min(size) > 0
    )


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32: PyTorch's align_corners=False sampling (source = (i + 0.5) * n_in / n_out
    - 0.5, clamped at 0; the upper neighbour clamped at the border), each row's two weights. Built
    outside inference mode whatever the caller's: a cached inference tensor could not be saved for a
    later backward."""
    with torch.inference_mode(False):
        scale = n_in / n_out
        source = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
        low = source.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        weight = source - low
        matrix = torch.zeros(n_out, n_in)
        rows = torch.arange(n_out)
        matrix.index_put_((rows, low), 1 - weight, accumulate=True)
        matrix.index_put_((rows, high), weight, accumulate=True)
        return matrix
