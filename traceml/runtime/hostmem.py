"""A cheap per-step host memory signal: the process's resident set every few steps (``step_host``).

Every :data:`EVERY`-th step for the first :data:`WARM_STEPS`, then as often as one read per
:data:`MIN_GAP_NS` allows.  Linux only (``/proc/self/statm``); elsewhere it is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from traceml.runtime._failopen import disable_piece
from traceml.runtime.step import FAST, native_slots

#: one host sample every this many steps (at least: the read adapts to the step rate, see below)
EVERY = 4
#: the first steps are read every EVERY-th step (a short run still gets enough samples to judge)
WARM_STEPS = 256
#: after the warm-up the stride doubles while reads come closer than this (a read costs the
#: training thread ~20 µs with the step's slow path: ≤ 0.04 % of it), and halves past 4× this
MIN_GAP_NS = 50_000_000
MAX_EVERY = 4096
STATM = "/proc/self/statm"

# with the C fast path the reader's state lives in its C base, whose exit reads on the memory
# steps itself (_fastclock.StatmCore, the same rule); a build with other constants is not used
if TYPE_CHECKING or FAST is None or getattr(FAST, "STATM", None) != (WARM_STEPS, MIN_GAP_NS, MAX_EVERY):
    _Base: type = object
else:
    _Base = FAST.StatmCore


class HostStepMemory(_Base):
    """``every`` and ``begins`` tell the step tracker to call :meth:`step_end` on those steps only
    and :meth:`step_begin` never (see :class:`traceml.runtime.step.StepMemory`).  On the C base the
    step context's C exit reads on those steps itself; these methods stay the reference."""

    __slots__ = native_slots(_Base, ("append", "every", "_fd", "_page", "_last_ts", "_last_step", "_floor"))
    begins = False

    def __init__(self, append: Callable[[tuple[Any, ...]], None], every: int = EVERY) -> None:
        self.append = append
        self.every = self._floor = max(1, int(every))
        self._last_ts = 0
        self._last_step = -1
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
            self._adapt(step, ts)
        except Exception:
            self.close()
            disable_piece("host-step-memory", "the per-step host memory signal")

    def _adapt(self, step: int, ts: int) -> None:
        """The stride for the next reads (the tracker re-reads ``every`` after each call)."""
        steps, self._last_step = step - self._last_step, step
        took, self._last_ts = ts - self._last_ts, ts
        if step < WARM_STEPS or took <= 0 or steps <= 0:
            return
        gap = took * self.every // steps  # between two reads at the current stride
        if gap < MIN_GAP_NS and self.every < MAX_EVERY:
            self.every *= 2
        elif gap > 4 * MIN_GAP_NS and self.every > self._floor:
            self.every //= 2

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
