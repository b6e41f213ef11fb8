"""Freed CPU memory kept for the next step instead of handed back to the kernel.

PyTorch's CPU tensors come from the C library's malloc. glibc serves every block above its mmap
threshold (32 MiB at most) with a fresh mapping and unmaps it on free, and gives the top of the
heap back once more than 128 KiB is free there. A training step allocates and frees the same
large activations every time, so every step touches fresh pages and the kernel zeroes each one
on a page fault: swin_t at batch 16 took about 280,000 page faults per float32 training step
(1.1 GiB of zeroed pages); with this setting it took under 1,500 and `swinx bench --mode train
--batch 16` ran 1.11x faster (Intel Xeon, family 6 model 167, 2 cores; one host type measured).

`keep_freed_memory` turns both off with `mallopt`: no mappings, and no trimming, so the memory of
one step serves the next and a steady loop takes almost no page faults. It also limits malloc to
one arena: a thread other than the main one (a server's worker, a training loop started in a
thread) otherwise gets an arena of its own, made of 64 MiB heaps that glibc deletes as soon as
they are empty, whatever the trim threshold; measured here (glibc 2.36), a 40 MiB tensor
allocated again and again in such a thread faulted all its 10,240 pages every time with only the
first two settings, and none with the third. The process keeps its
peak resident size (it would reach it again next step anyway). The `swinx` command calls it at
start; set SWINX_MALLOC=system to keep the C library's defaults.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
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
            settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_ARENA_MAX, 1))
            _applied = all([bool(mallopt(param, value)) for param, value in settings])
    return _applied
