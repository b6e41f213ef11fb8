"""Fast kernels chosen at run time, each beside the plain PyTorch op it replaces.

On x86 CPUs PyTorch ships oneDNN, whose linear kernel runs Swin's matrix shapes about twice
as fast as the default `addmm` (BLAS) and can apply GELU in the same pass. It has no
backward, so it serves inference only (no autograd graph being recorded), and it is skipped
under torch.compile/tracing, where the compiler picks kernels itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available()
                      and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn_usable(x: torch.Tensor) -> bool:
    return (_HAS_ONEDNN_LINEAR and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and x.dtype in _DTYPES)


_DTYPES = (torch.float32, torch.bfloat16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
           fast: bool = True) -> torch.Tensor:
    """F.linear (then exact erf GELU when `gelu`); through oneDNN on the CPU in inference."""
    if fast and _onednn_usable(x):
        if torch.is_autocast_enabled("cpu"):      # do what autocast would have done for F.linear
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif weight.dtype != x.dtype:
            return _plain(x, weight, bias, gelu)
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return _plain(x, weight, bias, gelu)


def _plain(x, weight, bias, gelu):
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y
