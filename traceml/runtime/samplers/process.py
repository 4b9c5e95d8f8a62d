"""PROCESS rows: this rank's RSS, CPU%, threads, open fds and its GPU memory (-1 without CUDA)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import psutil


class ProcessSampler:
    """One PROCESS row per call of :meth:`sample`.

    ``cuda_device`` returns the device index the training thread uses (None while CUDA is
    not in use); GPU columns are read only when torch is imported and CUDA initialized by
    the script, so sampling never creates a CUDA context.
    """

    def __init__(
        self,
        clock: Callable[[], int] = time.time_ns,
        cuda_device: Callable[[], int | None] | None = None,
        pid: int | None = None,
    ) -> None:
        self.clock = clock
        self._proc = psutil.Process(pid)
        self._proc.cpu_percent(None)  # first call primes the CPU counter
        self._cuda_device = cuda_device
        self._gpu_total: dict[int, int] = {}

    def sample(self) -> tuple[int | float, ...]:
        p = self._proc
        with p.oneshot():
            rss = int(p.memory_info().rss)
            cpu = float(p.cpu_percent(None))
            threads = int(p.num_threads())
            try:
                fds = int(p.num_fds())
            except (AttributeError, psutil.Error):
                fds = -1
        alloc, reserved, total = self._gpu_memory()
        return (self.clock(), cpu, rss, threads, fds, alloc, reserved, total)

    def _gpu_memory(self) -> tuple[int, int, int]:
        torch = sys.modules.get("torch")
        if torch is None or self._cuda_device is None:
            return -1, -1, -1
        try:
            if not torch.cuda.is_initialized():
                return -1, -1, -1
        except Exception:
            return -1, -1, -1
        dev = self._cuda_device()
        if dev is None:
            return -1, -1, -1
        total = self._gpu_total.get(dev)
        if total is None:
            total = self._gpu_total[dev] = int(torch.cuda.get_device_properties(dev).total_memory)
        return int(torch.cuda.memory_allocated(dev)), int(torch.cuda.memory_reserved(dev)), total
