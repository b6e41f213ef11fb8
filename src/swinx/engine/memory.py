"""Freed CPU memory kept for the next step instead of handed back to the kernel.

PyTorch's CPU tensors come from the C library's malloc. glibc serves every block above its mmap
threshold (32 MiB at most) with a fresh mapping and unmaps it on free, and gives the top of the
heap back once more than 128 KiB is free there. A training step allocates and frees the same
large activations every time, so every step touches fresh pages and the kernel zeroes each one
on a page fault: swin_t at batch 16 took about 280,000 page faults per float32 training step
(1.1 GiB of zeroed pages); with this setting it took under 1,500 and `swinx bench --mode train
--batch 16` ran 1.11x faster (Intel Xeon, family 6 model 167, 2 cores; one host type measured).

`keep_freed_memory` turns both off with `mallopt`: no mappings, and no trimming, so the memory of
one step serves the next and a steady loop takes almost no page faults. The process keeps its
peak resident size (it would reach it again next step anyway). The `swinx` command calls it at
start; set SWINX_MALLOC=system to keep the C library's defaults.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes a C int

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of unmapping and trimming it; True if it did.

    Does nothing (False) where the C library has no `mallopt` (macOS, musl) or SWINX_MALLOC=system.
    Process-wide and idempotent.
    """
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("SWINX_MALLOC", "").lower() != "system":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _applied
