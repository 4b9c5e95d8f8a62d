"""A cheap per-step host memory signal: the process's resident set every :data:`EVERY`-th step (``step_host``).

Linux only (``/proc/self/statm``, a few µs); elsewhere it is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from traceml.runtime._failopen import disable_piece

#: one host sample every this many steps
EVERY = 4
STATM = "/proc/self/statm"


class HostStepMemory:
    """``every`` and ``begins`` tell the step tracker to call :meth:`step_end` on those steps only
    and :meth:`step_begin` never (see :class:`traceml.runtime.step.StepMemory`)."""

    __slots__ = ("append", "every", "_fd", "_page")
    begins = False

    def __init__(self, append: Callable[[tuple[Any, ...]], None], every: int = EVERY) -> None:
        self.append = append
        self.every = max(1, int(every))
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._fd = os.open(STATM, os.O_RDONLY)

    def step_begin(self) -> None:
        return None

    def step_end(self, step: int, ts: int) -> None:
        if step % self.every or self._fd < 0:
            return
        try:
            resident = int(os.pread(self._fd, 128, 0).split()[1])
            self.append((step, ts, resident * self._page))
        except Exception:
            self.close()
            disable_piece("host-step-memory", "the per-step host memory signal")

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def host_step_memory(append: Callable[[tuple[Any, ...]], None]) -> HostStepMemory | None:
    """The signal, or None where ``/proc/self/statm`` cannot be read."""
    if not os.path.exists(STATM):
        return None
    try:
        return HostStepMemory(append)
    except OSError:
        return None
