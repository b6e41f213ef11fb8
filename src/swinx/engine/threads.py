"""Compute threads that follow what other processes leave of the machine.

PyTorch's CPU kernels run on an OpenMP team whose threads spin while they wait for each other.
On a quiet machine that is the fastest choice; with one other busy process, the thread that
shares a core with it is descheduled for whole time slices while its partner spins at the
barrier, and every one of a step's hundreds of small kernels waits for that slice: a small
model then ran 6-14x slower per epoch (an AMD EPYC and an Intel Xeon host, 2 cores each) instead
of the 2x its share of the machine would give.

`ThreadGovernor` samples, about once a second, how many cores the rest of the machine used
(Linux's /proc/stat minus this process's own time) and sets torch's thread count to the cores
left free (at least one, at most the count it started with). A quiet machine keeps every
thread; a competing process makes it step down to the cores nobody else wants, where spinning
costs nothing; when the competitor goes, the threads come back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

SAMPLE_SECONDS = 1.0
THREADS_HELP = "CPU compute threads (default 0: all cores, fewer while other processes keep some busy)"


def cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process) from /proc; None where there is no /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # cpu  user nice system idle iowait irq softirq steal ...: steal is time the hypervisor gave away
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    # after the command name: state ppid ... utime (14th field overall) stime (15th)
    return user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])


def threads_for(other_cores: float, machine_cores: int, most: int) -> int:
    """Threads to use when other processes keep `other_cores` cores busy: the free cores, rounded, in [1, most]."""
    return max(1, min(most, int(machine_cores - other_cores + 0.5)))


class ThreadGovernor:
    """Call `poll()` between steps; it resets torch's thread count when the machine's load changes.

    `fixed`: a thread count chosen by the user (never changed); 0 adapts, starting from torch's count.
    """

    def __init__(
        self,
        fixed: int = 0,
        sample_seconds: float | None = None,  # default SAMPLE_SECONDS
        ticks: Callable[[], tuple[int, int] | None] | None = None,  # default cpu_ticks
        clock: Callable[[], float] = time.monotonic,
        machine_cores: int | None = None,
    ):
        if fixed < 0:
            raise ValueError(f"threads must be 0 (follow the machine's load) or a positive count, got {fixed}")
        self.initial = torch.get_num_threads()
        if fixed:
            torch.set_num_threads(fixed)
        self.most = torch.get_num_threads()
        self.adaptive = fixed == 0 and self.most > 1
        self.sample_seconds = SAMPLE_SECONDS if sample_seconds is None else sample_seconds
        self.ticks, self.clock = ticks or cpu_ticks, clock
        self.machine_cores = machine_cores or os.cpu_count() or 1
        self.hertz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.changes: list[tuple[float, int]] = []  # (other cores seen, new thread count)
        sample = self.ticks() if self.adaptive else None
        self.adaptive = sample is not None  # no /proc: nothing to follow
        self._last = (self.clock(), sample)

    def poll(self) -> int:
        """Sample if a period has passed; returns the thread count in use."""
        if not self.adaptive:
            return torch.get_num_threads()
        now = self.clock()
        then, (busy0, own0) = self._last
        if now - then < self.sample_seconds:
            return torch.get_num_threads()
        sample = self.ticks()
        if sample is None:
            return torch.get_num_threads()
        busy, own = sample
        self._last = (now, sample)
        other = max(0.0, (busy - busy0) - (own - own0)) / self.hertz / (now - then)
        want = threads_for(other, self.machine_cores, self.most)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            self.changes.append((round(other, 2), want))
        return want

    def restore(self) -> None:
        """Back to the thread count torch had before the governor started."""
        torch.set_num_threads(self.initial)
