"""swinx's C kernels (csrc/*.c: window attention, GELU's backward, bfloat16 LayerNorm), built for this
machine on first use and loaded with ctypes.

The library is compiled with the system C compiler (`$CC`, else `cc`) at -O3 -march=native with
OpenMP, once per source, compiler and CPU, into a cache folder ($SWINX_CACHE, else
$XDG_CACHE_HOME/swinx or ~/.cache/swinx), written to a temporary name and renamed into place, so
concurrent first uses and interrupted builds never leave a broken library behind. Where there is
no compiler, the build fails, or SWINX_NATIVE=0 is set, `library()` returns None, `reason()` says
why, and swinx runs PyTorch's kernels instead: same results, somewhat slower. SWINX_NATIVE_CFLAGS adds
compiler flags (part of the cache key), e.g. -DSWINX_NO_BF16_DOT for the bfloat16 path of cores
without AVX512-BF16.

OpenMP: PyTorch's wheels bring GNU libgomp under the usual soname, and the dynamic loader hands
our library that same runtime, loaded with torch before it, so both share one thread team and its
settings.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCES = ("window_attention.c", "gelu.c", "layer_norm.c")
HEADERS = ("vector.h",)  # part of the cache key too
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")


def _flags() -> list[str]:
    return [*_FLAGS, *os.environ.get("SWINX_NATIVE_CFLAGS", "").split()]


_state: dict[str, object] = {}  # "lib" -> ctypes.CDLL or None, "reason" -> why None


def cache_dir() -> Path:
    explicit = os.environ.get("SWINX_CACHE")
    if explicit:
        return Path(explicit) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swinx" / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (a library built for one host
    must not load on another that shares the cache folder)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def _build(cc: str, target: Path) -> None:
    sources = [str(Path(__file__).with_name("csrc") / name) for name in SOURCES]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *_flags(), "-o", tmp, *sources, "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((Path(__file__).with_name("csrc") / name).read_bytes())
    for part in (" ".join(_flags()), version, _cpu_signature(), sys.platform):
        digest.update(part.encode())
    return cache_dir() / f"swinx_kernels_{digest.hexdigest()[:16]}.so"


def _declare(lib: ctypes.CDLL) -> None:
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    sizes = [I64] * 5 + [ctypes.c_float, ctypes.c_int]  # B, nW, heads, N, D, scale, threads
    forward = lib.swinx_window_attention
    forward.restype = ctypes.c_int
    forward.argtypes = [P] * 8 + [I64, P, P, P, ctypes.c_int] + sizes
    backward = lib.swinx_window_attention_backward
    backward.restype = ctypes.c_int
    backward.argtypes = [P] * 8 + [I64] + [P] * 12 + [ctypes.c_int] + sizes
    gelu = lib.swinx_gelu_backward
    gelu.restype = None
    gelu.argtypes = [P] * 3 + [I64, ctypes.c_int]
    gelu_sums = lib.swinx_gelu_backward_sums
    gelu_sums.restype = None
    gelu_sums.argtypes = [P] * 3 + [I64, I64, P, ctypes.c_int]
    norm = lib.swinx_layer_norm_bf16
    norm.restype = None
    norm.argtypes = [P] * 6 + [I64, I64, ctypes.c_float, ctypes.c_int]
    norm_backward = lib.swinx_layer_norm_bf16_backward
    norm_backward.restype = None
    norm_backward.argtypes = [P] * 7 + [I64, I64, ctypes.c_int]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; None where they cannot be had (see `reason`)."""
    if "lib" not in _state:
        _state["lib"], _state["reason"] = _load()
    return _state["lib"]  # type: ignore[return-value]


@torch.compiler.assume_constant_result
def available() -> bool:
    """`library() is not None`, as a constant for torch.compile's graphs (built on first call)."""
    return library() is not None


def reason() -> str:
    """Why `library()` is None ("" when it is loaded)."""
    library()
    return str(_state["reason"])


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("SWINX_NATIVE", "1") == "0":
        return None, "SWINX_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return None, f"the C kernels are built on Linux only (this is {sys.platform})"
    cc = _compiler()
    if cc is None:
        return None, f"no C compiler ({os.environ.get('CC') or 'cc'} not found; install gcc or set CC)"
    try:
        path = _library_path(cc)
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"could not build or load the C kernels: {error}"
    return lib, ""


def reset() -> None:
    """Forget the loaded library (tests: the next `library()` builds or loads again)."""
    _state.clear()
