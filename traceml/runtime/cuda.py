"""GPU time per phase from pooled CUDA events, and per-step CUDA memory peaks.

The training thread only records events (no synchronize, ever); the sender thread resolves completed steps
into STEP_GPU rows, oldest first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from traceml.runtime._failopen import disable_piece, log_once
from traceml.runtime.step import DATALOADER, H2D, OPTIMIZER

#: STEP_GPU column index of a phase index: h2d..optimizer -> 0..3, whole step -> 4
_STEP_COL = 4


class Event(Protocol):
    def record(self) -> None: ...
    def query(self) -> bool: ...
    def elapsed_time(self, end: Any) -> float: ...


class GpuTimer:
    """Event pairs per phase, resolved off the training thread.

    ``max_pending`` bounds how far the GPU may lag behind the CPU: beyond it, steps are
    not GPU-timed (counted in :attr:`skipped_steps`) rather than growing the pool forever.
    ``record(event)`` records on the current stream (default: ``event.record()``; see
    :func:`cuda_recorder` for the fast CUDA path).
    """

    def __init__(
        self,
        new_event: Callable[[], Event],
        max_pending: int = 1024,
        record: Callable[[Event], None] | None = None,
    ) -> None:
        self._new_event = new_event
        self._record_on_stream = record
        self._resolve_lock = threading.Lock()  # the sender thread and close() may both resolve
        self._pool: deque[Event] = deque()
        self._open: list[Event | None] = [None] * (OPTIMIZER + 1)
        self._pairs: list[tuple[int, Event, Event]] = []
        self._step_start: Event | None = None
        self._pending: deque[tuple[int, int, Event, Event, list[tuple[int, Event, Event]]]] = deque()
        self.max_pending = max_pending
        self.enabled = True
        self.skipped_steps = 0
        self.resolved_steps = 0
        self.events_created = 0

    # -- training thread -------------------------------------------------------------
    def _take(self) -> Event:
        try:
            return self._pool.pop()
        except IndexError:
            self.events_created += 1
            return self._new_event()

    def _record(self) -> Event | None:
        if not self.enabled:
            return None
        try:
            ev = self._take()
            if self._record_on_stream is None:
                ev.record()
            else:
                self._record_on_stream(ev)
            return ev
        except Exception:
            self._fail()
            return None

    def _fail(self) -> None:
        self.enabled = False
        disable_piece("cuda-events", "GPU phase timing (CUDA events)")

    def begin(self, phase: int) -> None:
        if phase == DATALOADER:
            return
        self._open[phase] = self._record()

    def end(self, phase: int) -> None:
        start = self._open[phase]
        if start is None:
            return
        self._open[phase] = None
        stop = self._record()
        if stop is None:
            self._pool.append(start)
        else:
            self._pairs.append((phase, start, stop))

    def cancel(self, phase: int) -> None:
        """Forget an opened phase (the call turned out not to be one, e.g. a CPU->CPU ``.to``)."""
        start = self._open[phase]
        if start is not None:
            self._open[phase] = None
            self._pool.append(start)

    def step_begin(self) -> None:
        # copies made between steps are carried into this step (as on the CPU clock); any other
        # phase recorded outside a step (an eval forward) is dropped
        kept = [p for p in self._pairs if p[0] == H2D]
        if len(kept) != len(self._pairs):
            for p in self._pairs:
                if p[0] != H2D:
                    self._pool.append(p[1])
                    self._pool.append(p[2])
        self._pairs = kept
        self._step_start = self._record()

    def step_end(self, step: int, ts_ns: int) -> None:
        start = self._step_start
        self._step_start = None
        pairs, self._pairs = self._pairs, []
        stop = self._record() if start is not None else None
        if start is None or stop is None:
            self._recycle(pairs, start, stop)
            return
        if len(self._pending) >= self.max_pending:
            self.skipped_steps += 1
            log_once(
                "cuda-lag",
                "traceml: the GPU is more than %d steps behind the CPU; GPU phase times are skipped for such steps",
                self.max_pending,
            )
            self._recycle(pairs, start, stop)
            return
        self._pending.append((step, ts_ns, start, stop, pairs))

    def _recycle(self, pairs: list[tuple[int, Event, Event]], *events: Event | None) -> None:
        for _, a, b in pairs:
            self._pool.append(a)
            self._pool.append(b)
        for ev in events:
            if ev is not None:
                self._pool.append(ev)

    # -- background thread -----------------------------------------------------------
    @property
    def pending_steps(self) -> int:
        return len(self._pending)

    def resolve(self) -> list[tuple[int, ...]]:
        """STEP_GPU rows of the oldest steps whose events have all completed (never blocks)."""
        rows: list[tuple[int, ...]] = []
        if not self.enabled:
            return rows
        with self._resolve_lock:
            self._resolve_into(rows)
        return rows

    def _resolve_into(self, rows: list[tuple[int, ...]]) -> None:
        # One query per step: events recorded on one stream complete in order, so a finished
        # step-end event means the whole step finished.  A phase recorded on another stream
        # that is still running makes elapsed_time raise: then the step waits for next time.
        done = 0
        try:
            while self._pending:
                step, ts_ns, start, stop, pairs = self._pending[0]
                if not stop.query():
                    break
                try:
                    us = self._durations_us(start, stop, pairs)
                except RuntimeError:
                    if all(b.query() for _, _, b in pairs):
                        raise  # everything finished: a real CUDA error
                    break
                rows.append((step, ts_ns, *us))
                self._pending.popleft()
                self._recycle(pairs, start, stop)
                self.resolved_steps += 1
                done += 1
                if done % 64 == 0:
                    time.sleep(0)  # hand the GIL back to the training thread now and then
        except Exception:
            self._fail()

    @staticmethod
    def _durations_us(start: Event, stop: Event, pairs: list[tuple[int, Event, Event]]) -> list[int]:
        us = [0.0] * (_STEP_COL + 1)
        for phase, a, b in pairs:
            us[phase - 1] += a.elapsed_time(b) * 1000.0
        span = start.elapsed_time(stop)
        if pairs and pairs[0][0] == H2D and pairs[0][1] is not start:
            span = max(span, pairs[0][1].elapsed_time(stop))  # a copy carried from before the step
        us[_STEP_COL] = span * 1000.0
        return [int(round(v)) for v in us]


class CudaStepMemory:
    """Per-step CUDA memory peaks: reset at step start, read at step end (STEP_MEMORY rows).

    Uses torch's C entry points directly when present: ``max_memory_allocated`` and
    ``max_memory_reserved`` would each flatten the allocator's whole statistics dict, one
    nested read gives both peaks for half the cost.
    """

    def __init__(self, cuda: Any, device: int, append: Callable[[tuple[int, ...]], None], c_api: Any = None) -> None:
        self._cuda = cuda
        self.device = device
        self._append = append
        self.enabled = True
        self._reset = getattr(c_api, "_cuda_resetPeakMemoryStats", None)
        self._stats = getattr(c_api, "_cuda_memoryStats", None)

    def step_begin(self) -> None:
        if self.enabled:
            try:
                if self._reset is not None:
                    self._reset(self.device)
                else:
                    self._cuda.reset_peak_memory_stats(self.device)
            except Exception:
                self.enabled = False
                disable_piece("cuda-memory", "per-step CUDA memory peaks")

    def step_end(self, step: int, ts_ns: int) -> None:
        if self.enabled:
            try:
                if self._stats is not None:
                    stats = self._stats(self.device)
                    alloc = stats["allocated_bytes"]["all"]["peak"]
                    reserved = stats["reserved_bytes"]["all"]["peak"]
                else:
                    alloc = self._cuda.max_memory_allocated(self.device)
                    reserved = self._cuda.max_memory_reserved(self.device)
                self._append((step, ts_ns, int(alloc), int(reserved)))
            except Exception:
                self.enabled = False
                disable_piece("cuda-memory", "per-step CUDA memory peaks")


def cuda_recorder(torch: Any, device: int) -> Callable[[Event], None] | None:
    """Record an event on ``device``'s current stream without building a Stream object per
    call (``Event.record()`` does, via ``torch.cuda.current_stream()``): the stream handle is
    read through the C API and its Stream object cached.  None when the C API is missing."""
    get_current = getattr(torch._C, "_cuda_getCurrentStream", None)
    base_record = getattr(getattr(torch._C, "_CudaEventBase", None), "record", None)
    if get_current is None or base_record is None:
        return None
    stream_cls = torch.cuda.Stream
    cache: dict[Any, Any] = {}

    def record(ev: Event) -> None:
        key = get_current(device)
        stream = cache.get(key)
        if stream is None:
            if len(cache) > 64:
                cache.clear()
            stream = cache[key] = stream_cls(stream_id=key[0], device_index=key[1], device_type=key[2])
        base_record(ev, stream)

    return record
