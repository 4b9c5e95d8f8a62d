"""SYSTEM rows: the node's CPU% and RAM (sampled by local rank 0 only)."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil


class SystemSampler:
    def __init__(self, node_rank: int, clock: Callable[[], int] = time.time_ns) -> None:
        self.node_rank = node_rank
        self.clock = clock
        psutil.cpu_percent(None)  # prime: the next call measures since now

    def sample(self) -> tuple[int | float, ...]:
        vm = psutil.virtual_memory()
        return (
            self.clock(),
            self.node_rank,
            float(psutil.cpu_percent(None)),
            int(vm.total - vm.available),
            int(vm.total),
        )
