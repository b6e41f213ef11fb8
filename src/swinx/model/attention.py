"""Window attention, V1 (scaled dot product) and V2 (scaled cosine), with a fused and an exact path."""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F
from torch import nn

from swinx.model import native, ops
from swinx.model.position import log_spaced_coords, relative_position_index
from swinx.model.windows import MASK_FILL, WindowGeometry, WindowIndex, shift_mask

_MAX_CACHE_ENTRIES = 32
_BF16_FUSED: dict[tuple, bool] = {}  # (q shape, bias shape, dtype) -> the fused kernel was faster (CPU bfloat16)
_MAX_LOGIT_SCALE = math.log(100.0)  # V2 caps the learned temperature at 100


def caching_allowed() -> bool:
    """Cached derived tensors (bias, index, permutations) are for eager runs. Compiled, traced and
    exported graphs fold these tensors in as constants themselves; a Python dict lookup there
    would only cost a graph break."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.compiler.is_exporting())


def _fused_attention(q, k, v, bias, scale: float, drop: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v through PyTorch's fused kernel; q, k, v (B, nW, heads, N, D),
    bias (1 or nW, heads, N, N)."""
    B, nW, heads, N, D = q.shape
    # The mask must be 4-D: PyTorch's fused CPU kernel takes a 4-D mask only and silently
    # falls back to the unfused math (3-4x slower) for a 3-D one.
    # Exported, the bias has a row per window (`indexed_bias`); asking would guard on the size.
    if not torch.compiler.is_exporting() and bias.shape[0] == 1:  # one bias for all windows: windows into the batch
        shape, mask = (B * nW, heads, N, D), bias  # mask (1, heads, N, N)
    else:  # a bias per window: fold windows into the heads
        shape, mask = (B, nW * heads, N, D), bias.reshape(1, nW * heads, N, N)
    out = F.scaled_dot_product_attention(
        q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=mask, dropout_p=drop, scale=scale
    )
    return out.view(B, nW, heads, N, D)


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def _sizes(q: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor, scale: float) -> tuple:
    B, _, heads, D = q.shape
    N = bias.shape[-2]
    return B, tokens.numel() // N, heads, N, D, scale, torch.get_num_threads()


def _kernel_forward(q, k, v, tokens, bias, scale: float, lse: torch.Tensor | None) -> torch.Tensor:
    B, L, heads, D = q.shape
    out = torch.empty(B, L, heads, D, dtype=q.dtype)
    failed = native.library().swinx_window_attention(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), tokens.data_ptr(),
        bias.data_ptr(), bias.shape[0], out.data_ptr(), _strides(out), None if lse is None else lse.data_ptr(),
        q.dtype == torch.bfloat16, *_sizes(q, tokens, bias, scale),
    )  # fmt: skip
    if failed:
        raise MemoryError("window attention: could not allocate its per-thread buffers")
    return out


# The kernel as two operators, so that eager code and torch.compile's graphs call the same thing:
# swinx::window_attention (output and, for training, the log-sum-exp) with its backward
# swinx::window_attention_backward, registered as its autograd formula.


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("swinx::window_attention", mutates_args=())
def _attention_op(
    qkv: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor, scale: float, lse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, heads, D) output for qkv (B, L, 3, heads, D), and the (B, nW, heads, N) log-sum-exp where
    `lse` (else empty)."""
    q, k, v = _last_dim_contiguous(qkv).unbind(2)
    tokens, bias = tokens.contiguous(), bias.contiguous()
    B, _, heads, _ = q.shape
    N = bias.shape[-2]
    sums = torch.empty(B, tokens.numel() // N, heads, N) if lse else q.new_empty(0)
    return _kernel_forward(q, k, v, tokens, bias, scale, sums if lse else None), sums


@_attention_op.register_fake
def _(qkv, tokens, bias, scale, lse):
    B, L, _, heads, D = qkv.shape
    N = bias.shape[-2]
    dtype = torch.float32 if lse else qkv.dtype
    sums = qkv.new_empty((B, tokens.shape[0] // N, heads, N) if lse else (0,), dtype=dtype)
    return qkv.new_empty(B, L, heads, D), sums


@torch.library.custom_op("swinx::window_attention_backward", mutates_args=())
def _attention_backward_op(
    grad: torch.Tensor,
    qkv: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dq, dk, dv as qkv's (B, L, 3, heads, D) gradient, and the bias gradient (bias's shape)."""
    q, k, v = _last_dim_contiguous(qkv).unbind(2)
    grad, tokens, bias, out, lse = (t.contiguous() for t in (grad.to(q.dtype), tokens, bias, out, lse))
    B, L, heads, D = q.shape
    dqkv = torch.empty(B, L, 3, heads, D, dtype=q.dtype)
    dq, dk, dv = dqkv.unbind(2)
    dbias = torch.zeros_like(bias)
    failed = native.library().swinx_window_attention_backward(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), tokens.data_ptr(),
        bias.data_ptr(), bias.shape[0], out.data_ptr(), _strides(out), grad.data_ptr(), _strides(grad),
        lse.data_ptr(), dq.data_ptr(), _strides(dq), dk.data_ptr(), _strides(dk), dv.data_ptr(), _strides(dv),
        dbias.data_ptr(), q.dtype == torch.bfloat16, *_sizes(q, tokens, bias, scale),
    )  # fmt: skip
    if failed:
        raise MemoryError("window attention backward: could not allocate its per-thread buffers")
    return dqkv, dbias


@_attention_backward_op.register_fake
def _(grad, qkv, tokens, bias, out, lse, scale):
    return qkv.new_empty(qkv.shape), bias.new_empty(bias.shape)


def _setup_attention(ctx, inputs, output):
    qkv, tokens, bias, scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(qkv, tokens, bias, out, lse)
    ctx.scale = scale


def _backward_attention(ctx, grad, _grad_lse):
    qkv, tokens, bias, out, lse = ctx.saved_tensors
    dqkv, dbias = torch.ops.swinx.window_attention_backward(grad, qkv, tokens, bias, out, lse, ctx.scale)
    return dqkv, None, dbias if ctx.needs_input_grad[2] else None, None, None


_attention_op.register_autograd(_backward_attention, setup_context=_setup_attention)


def _native_attention(qkv, tokens, bias, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v by swinx's C kernel (csrc/window_attention.c) for the windows
    that `tokens` (nW * N,) cuts from a map of L tokens: qkv (B, L, 3, heads, D) (a qkv layer's output,
    any strides but the last dimension's), float32 or bfloat16, bias (1 or nW, heads, N, NP) float32,
    padded with -inf (`pad_keys`). q, k and v are read in place and their gradient is one tensor, so
    nothing is split or stacked around the kernel.
    Returns (B, L, heads * D), each token's output in its place in the map; differentiable (the
    forward then also keeps each query row's log-sum-exp for the backward)."""
    B, L, _, heads, D = qkv.shape
    training = torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad)
    out, _ = torch.ops.swinx.window_attention(qkv, tokens, bias, scale, training)
    return out.view(B, L, heads * D)


def _compiling_with_operators() -> bool:
    """torch.compile (not export, not TorchScript tracing): the kernel goes into the graph as an operator."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not torch.jit.is_tracing()


def pad_keys(bias: torch.Tensor) -> torch.Tensor:
    """(.., N, N) -> (.., N, NP) contiguous, NP = N rounded up to 16, -inf in the added key columns."""
    N = bias.shape[-1]
    return F.pad(bias, (0, -N % 16), value=float("-inf")).contiguous()


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a relative position bias.

    V1: softmax(q k^T / sqrt(d) + B) v with a learned ((2M-1)^2, heads) table B.
    V2: softmax(cos(q, k) * tau + 16 sigmoid(MLP(log-spaced offsets))) v, tau = exp(min(logit_scale, log 100)).
    Derived tensors (index, coordinates, shift masks, and in inference the whole
    additive bias) are computed once per geometry, device and dtype and cached.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        version: int = 1,
        pretrained_window_size: int = 0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size = window_size
        self.version = version
        self.pretrained_window_size = pretrained_window_size
        self.attn_drop = attn_drop
        self.fused = True
        if version == 1:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
            self.cpb_mlp = nn.Sequential(
                nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
            )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._cache: dict[tuple, torch.Tensor] = {}

    # ----- derived tensors -------------------------------------------------------------
    def _cached(self, key: tuple, build, constant: bool = True):
        """`build()` once per key. A `constant` (index, coordinates, mask) is built as a normal
        tensor even under inference_mode, so that a later training step may use it."""
        if not caching_allowed():
            return build()
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= _MAX_CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
            if constant:
                with torch.inference_mode(False), torch.no_grad():
                    value = build()
            else:
                value = build()
            self._cache[key] = value
        return value

    def _bias_parameters(self) -> list[nn.Parameter]:
        return [self.relative_position_bias_table] if self.version == 1 else list(self.cpb_mlp.parameters())

    def position_bias(self, window: tuple[int, int]) -> torch.Tensor:
        """(heads, N, N) relative position bias of a window (N = wh * ww), float32."""
        device = self.proj.weight.device
        M = self.window_size
        if self.version == 1:
            index = self._cached(("index", window, device), lambda: relative_position_index(window, (M, M), device))
            table = self.relative_position_bias_table
        else:
            index = self._cached(("index", window, device), lambda: relative_position_index(window, None, device))
            pretrained = (self.pretrained_window_size,) * 2
            coords = self._cached(("coords", window, device), lambda: log_spaced_coords(window, pretrained, device))
            table = 16 * torch.sigmoid(self.cpb_mlp(coords))  # ((2wh-1)(2ww-1), heads)
        N = window[0] * window[1]
        return table[index.reshape(-1)].reshape(N, N, -1).permute(2, 0, 1).float()  # (heads, N, N)

    def shift_mask(self, geometry: WindowGeometry, padded: tuple[int, int]) -> torch.Tensor | None:
        """(nW, N, N) additive shift mask for a padded map, or None."""
        device = self.proj.weight.device
        key = ("mask", padded, geometry.window, geometry.shift, device)
        return self._cached(key, lambda: shift_mask(*padded, geometry.window, geometry.shift, device))

    def attention_bias(self, geometry: WindowGeometry, padded: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Additive bias (1 or nW, heads, N, N): position bias plus shift mask, in `dtype`."""

        def build() -> torch.Tensor:
            bias = self.position_bias(geometry.window)[None]
            mask = self.shift_mask(geometry, padded)
            if mask is not None:
                bias = bias + mask[:, None]
            return bias.to(dtype)

        if not caching_allowed():  # compiled, traced or exported: the graph computes the bias itself,
            return ops.materialized(build())  # once per step, not once per score (see `materialized`)
        params = self._bias_parameters()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()  # training: the bias is part of the graph
        device = self.proj.weight.device
        if device.type != "cpu":
            return build()  # the check below would wait for the device at every block

        # Reused while the bias parameters hold the same values. Their version counters cannot
        # tell: fused AdamW (torch 2.14) and writes through `.data` change them in place without
        # a bump. The table (or the V2 MLP) is a few thousand numbers; the bias is up to nW x
        # heads x N x N.
        def fresh() -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
            return tuple(p.detach().clone() for p in params), build()

        key = ("bias", padded, geometry, dtype, device, torch.is_inference_mode_enabled())
        kept, bias = self._cached(key, fresh, constant=False)
        if not all(torch.equal(k, p) for k, p in zip(kept, params, strict=True)):
            kept, bias = self._cache[key] = fresh()
        return bias

    def _padded(self, bias: torch.Tensor, geometry: WindowGeometry, padded: tuple[int, int]) -> torch.Tensor:
        """`pad_keys(bias)`, kept while `attention_bias` returns the same cached tensor."""
        key = ("padded", padded, geometry, bias.dtype, bias.device, torch.is_inference_mode_enabled())
        source, value = self._cached(key, lambda: (bias, pad_keys(bias)), constant=False)
        if source is not bias:
            source, value = self._cache[key] = bias, pad_keys(bias)
        return value

    def indexed_bias(self, index: WindowIndex) -> torch.Tensor:
        """(nW, heads, M*M, M*M) additive bias over the slots of `WindowIndex` windows, float32.

        Position bias by slot offset (a clamped window of w < M tokens reads the same
        table entries as the eager model, V2 normalised by its own size), the shift mask
        (zero for blocks and sizes without shift) and -inf for keys in unused slots.
        """
        M, device = self.window_size, self.proj.weight.device
        index_table = relative_position_index((M, M), None, device)
        if self.version == 1:
            table = self.relative_position_bias_table
        else:
            pretrained = (self.pretrained_window_size,) * 2
            table = 16 * torch.sigmoid(self.cpb_mlp(log_spaced_coords((M, M), pretrained, device, (index.window,) * 2)))
        N = M * M
        position = table[index_table.reshape(-1)].reshape(N, N, -1).permute(2, 0, 1).float()  # (heads, N, N)
        mask = (index.labels[:, :, None] != index.labels[:, None, :]).float() * MASK_FILL  # (nW, N, N)
        mask = mask.masked_fill(~index.used, float("-inf"))
        return position[None] + mask[:, None]

    # ----- attention -----------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        geometry: WindowGeometry | None = None,
        padded: tuple[int, int] | None = None,
        return_attn: bool = False,
        bias: torch.Tensor | None = None,
    ):
        """x: (B, nW, N, C) windows of a padded map cut by `geometry`.

        Returns (B, nW, N, C), and with `return_attn` also the attention (B, nW, heads, N, N),
        which only the exact path computes. `bias` (1 or nW, heads, N, N) replaces the bias
        and mask of `geometry` (exported graphs, see `indexed_bias`).
        """
        B, nW, N, C = x.shape
        q, k, v, scale = self._qkv(x)  # 3 x (B, nW, N, heads, D)
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))  # 3 x (B, nW, heads, N, D)
        bias = self.attention_bias(geometry, padded, q.dtype) if bias is None else bias.to(q.dtype)
        drop = self.attn_drop if self.training else 0.0

        attn = None
        if self.fused and not return_attn and self._fused_pays(q, k, v, bias, scale):
            out = _fused_attention(q, k, v, bias, scale, drop)
        else:
            attn = torch.softmax((q * scale) @ k.transpose(-2, -1) + bias, dim=-1)  # (B, nW, heads, N, N)
            out = F.dropout(attn, drop, self.training) @ v
        out = out.transpose(2, 3).reshape(B, nW, N, C)
        out = self.proj_drop(ops.linear(out, self.proj.weight, self.proj.bias, fast=self.fused))
        return (out, attn) if return_attn else out

    def _qkv(self, x: torch.Tensor):
        """q, k, v (..., heads, D) views of the qkv layer's output for tokens x (..., C), V2's q and k
        normalised (q times the temperature), and the scale of q k^T."""
        heads, D = self.num_heads, self.head_dim
        qkv_bias = self.qkv.bias
        if self.version == 2 and self.q_bias is not None:
            qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = ops.linear(x, self.qkv.weight, qkv_bias, fast=self.fused)
        q, k, v = qkv.view(*x.shape[:-1], 3, heads, D).unbind(-3)
        if self.version == 1:
            return q, k, v, D**-0.5
        tau = torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp().view(heads, 1)
        return F.normalize(q, dim=-1) * tau, F.normalize(k, dim=-1), v, 1.0

    def _packed_qkv(self, x: torch.Tensor):
        """`_qkv` as one (..., 3, heads, D) tensor: V1's qkv output itself, V2's normalised q and k
        stacked with v (in v's dtype: under autocast q carries its float32 temperature)."""
        if self.version == 1:
            qkv = ops.linear(x, self.qkv.weight, self.qkv.bias, fast=self.fused)
            return qkv.view(*x.shape[:-1], 3, self.num_heads, self.head_dim), self.head_dim**-0.5
        q, k, v, scale = self._qkv(x)
        return torch.stack([q.to(v.dtype), k.to(v.dtype), v], dim=-3), scale

    def native_takes(self, x: torch.Tensor) -> bool:
        """Whether `attend_map` can run on x: CPU float32 or bfloat16 (autocast too), eager or under
        torch.compile, inference or training without attention dropout, with swinx's C kernels built
        (`native.available()`)."""
        return (
            self.fused
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and (not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == torch.bfloat16)
            and ops.native_enabled()
            and (caching_allowed() or _compiling_with_operators())
            and not (self.training and self.attn_drop)
            and native.available()
        )

    def attend_map(
        self, x: torch.Tensor, tokens: torch.Tensor, geometry: WindowGeometry, padded: tuple[int, int]
    ) -> torch.Tensor:
        """Window attention over a whole padded map x (B, L, C) by the C kernel (`native_takes`):
        `tokens` (nW * N,) lists each window's tokens (the roll and partition, `window_order`). Returns
        (B, L, C) in map order: the same numbers as forward() on the gathered windows, without the
        gathers."""
        qkv, scale = self._packed_qkv(x)
        bias = self.attention_bias(geometry, padded, torch.float32)
        bias = self._padded(bias, geometry, padded) if caching_allowed() and not bias.requires_grad else pad_keys(bias)
        out = _native_attention(qkv, tokens, bias, scale)
        return self.proj_drop(ops.linear(out, self.proj.weight, self.proj.bias, fast=self.fused))

    def _fused_pays(self, q, k, v, bias, scale) -> bool:
        """Whether the fused kernel is the faster path here. CPU training with a bias that needs a
        gradient: never (PyTorch has no fused CPU kernel for it and falls back to the same math
        plus extra masking passes). Float32 inference: always. Bfloat16 inference on the CPU: it
        depends on the host (plain batched matmuls win on AVX512-BF16, the fused kernel on AMX),
        so both are timed once per shape and the winner remembered."""
        if q.device.type == "cpu" and torch.is_grad_enabled() and bias.requires_grad:
            return False
        if not (q.dtype == torch.bfloat16 and q.device.type == "cpu"):
            return True
        if torch.is_grad_enabled() or not caching_allowed():
            return False
        key = (tuple(q.shape), tuple(bias.shape), q.dtype)
        choice = _BF16_FUSED.get(key)
        if choice is None:
            fused = ops.best_seconds(lambda: _fused_attention(q, k, v, bias, scale, 0.0))
            plain = ops.best_seconds(lambda: torch.softmax((q * scale) @ k.transpose(-2, -1) + bias, dim=-1) @ v)
            choice = _BF16_FUSED[key] = fused < plain
        return choice

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, window={self.window_size}, v{self.version}, "
            f"pretrained_window={self.pretrained_window_size}, fused={self.fused}"
        )
