"""What machine a measurement was taken on: CPU model, family/model, ISA level, cores, threads.

Machines of one kind differ (an Intel host with AMX runs bfloat16 matmuls ten times faster than
an AMD Zen 4 host with AVX-512 only), so every benchmark row carries these fields, and results
files are named after the CPU.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path

import torch

# The best matrix unit the flags show, best first: what decides float32 and bfloat16 GEMM rates.
_ISA_LEVELS = (
    ("amx_bf16", "AVX-512 + AMX-BF16"),
    ("avx512_bf16", "AVX-512 + BF16"),
    ("avx512f", "AVX-512"),
    ("avx2", "AVX2"),
    ("sse4_2", "SSE4.2"),
)


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, read once per process (empty where there is none)."""
    if text is None:
        text = _proc_cpuinfo()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def isa_level(flags: set[str]) -> str:
    """The best vector / matrix extension among the CPU's flags, e.g. "AVX-512 + AMX-BF16"."""
    return next((name for flag, name in _ISA_LEVELS if flag in flags), "baseline")


def host_info(text: str | None = None) -> dict:
    """CPU model string, vendor, family, model, ISA level, cores this process may use, torch threads."""
    info = cpuinfo(text)
    flags = set(info.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id", ""),
        "family": int(info["cpu family"]) if info.get("cpu family", "").isdigit() else None,
        "cpu_model": int(info["model"]) if info.get("model", "").isdigit() else None,
        "isa": isa_level(flags) if flags else platform.machine(),
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "threads": torch.get_num_threads(),
    }


def host_line(info: dict | None = None) -> str:
    """One line for a benchmark's header, e.g. 'Intel(R) Xeon(R) Processor (GenuineIntel family 6 model 143,
    AVX-512 + AMX-BF16), 2 cores, 2 threads'."""
    h = info or host_info()
    ident = f"{h['vendor']} family {h['family']} model {h['cpu_model']}, " if h["family"] is not None else ""
    return f"{h['cpu']} ({ident}{h['isa']}), {h['cores']} cores, {h['threads']} threads"


def host_slug(info: dict | None = None) -> str:
    """A file-name part naming the host type, e.g. 'amd-epyc-9r14-f25m17' or 'intel-xeon-f6m143'."""
    h = info or host_info()
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\b\d+-core\b|\bprocessor\b", " ", h["cpu"], flags=re.I)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "cpu"
    if h["family"] is not None:
        slug += f"-f{h['family']}m{h['cpu_model']}"
    return slug
