"""The hot path: the phase clock, ``trace_step``'s context and ``trace_time`` regions.

Everything here runs on the training thread, so it does only ``perf_counter_ns``,
integer arithmetic and one :meth:`BoundedTable.append` per step.  Phases are timed
by the patches in :mod:`traceml.runtime.hooks`, which add nanoseconds into
:attr:`PhaseClock.acc`; only the outermost phase is timed, so phases never overlap
and ``residual = step - sum(phases) >= 0``.

Attribution rules (documented for users in ``trace_step``):

* dataloader waits and host-to-device copies made *between* steps (typically
  ``batch = next(it); batch = batch.to(dev)`` before entering ``with``) are carried
  into the next step: ``step_us`` = that pending time + the traced body;
* forward/backward/optimizer time outside any step (an eval loop) is not recorded;
* with gradient accumulation, several forward/backward calls inside one step sum.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from traceml.runtime._failopen import disable_piece

if TYPE_CHECKING:
    from traceml.store import BoundedTable

_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns
_get_ident = threading.get_ident

#: phase indices into PhaseClock.acc (same order as traceml.schema.PHASES, residual excluded)
DATALOADER, H2D, FORWARD, BACKWARD, OPTIMIZER = range(5)
NO_PHASE = -1
#: phases whose time spent between steps is carried into the next step
CARRIED_PHASES = (DATALOADER, H2D)

F = TypeVar("F", bound=Callable[..., Any])


class GpuPhaseTimer(Protocol):
    """What the clock needs from the CUDA event timer (:class:`traceml.runtime.cuda.GpuTimer`)."""

    def begin(self, phase: int) -> None: ...
    def end(self, phase: int) -> None: ...
    def cancel(self, phase: int) -> None: ...
    def step_begin(self) -> None: ...
    def step_end(self, step: int, ts_ns: int) -> None: ...


class StepMemory(Protocol):
    def step_begin(self) -> None: ...
    def step_end(self, step: int, ts_ns: int) -> None: ...


class PhaseClock:
    """Shared state of the phase patches and the step context (one per agent).

    ``owner`` is the training thread: phases are only timed there, so a prefetch thread
    that iterates a DataLoader does not count as the training loop waiting.
    """

    __slots__ = ("enabled", "owner", "phase", "acc", "opt_depth", "opt_t0", "gpu")

    def __init__(self) -> None:
        self.enabled = True
        self.owner = threading.main_thread().ident or 0
        self.phase = NO_PHASE
        self.acc = [0, 0, 0, 0, 0]
        self.opt_depth = 0
        self.opt_t0 = 0
        self.gpu: GpuPhaseTimer | None = None


def timed(clock: PhaseClock, phase: int, fn: Callable[..., Any], gpu: bool = True) -> Callable[..., Any]:
    """Wrap ``fn`` so its outermost calls on the training thread add to ``clock.acc[phase]``."""

    def traceml_timed(*args: Any, **kwargs: Any) -> Any:
        c = clock
        if c.phase >= 0 or not c.enabled or _get_ident() != c.owner:
            return fn(*args, **kwargs)
        c.phase = phase
        g = c.gpu if gpu else None
        if g is not None:
            g.begin(phase)
        t0 = _perf_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            c.acc[phase] += _perf_ns() - t0
            c.phase = NO_PHASE
            if g is not None:
                g.end(phase)

    traceml_timed.__wrapped__ = fn  # type: ignore[attr-defined]
    traceml_timed.__name__ = getattr(fn, "__name__", "traceml_timed")
    traceml_timed.__doc__ = getattr(fn, "__doc__", None)
    return traceml_timed


class StepTracker:
    """``with trace_step(model):`` — one STEP_TIME row per step, regions, GPU/memory hand-off.

    One instance per agent, re-entered every step (no allocation per step).  A nested
    ``trace_step`` (say an integration plus the user's own) counts as the same step.
    """

    __slots__ = (
        "clock",
        "step_table",
        "region_table",
        "step",
        "depth",
        "t0",
        "pending",
        "regions",
        "gpu",
        "memory",
        "enabled",
        "on_cuda_check",
        "steps_failed",
    )

    def __init__(self, clock: PhaseClock, step_table: BoundedTable, region_table: BoundedTable) -> None:
        self.clock = clock
        self.step_table = step_table
        self.region_table = region_table
        #: index of the current (or next) step; every rank counts its own from 0
        self.step = 0
        self.depth = 0
        self.t0 = 0
        self.pending = 0
        self.regions: dict[str, list[int]] = {}
        self.gpu: GpuPhaseTimer | None = None
        self.memory: StepMemory | None = None
        self.enabled = True
        #: called at step start until it returns False (the agent's "is CUDA in use yet?" probe)
        self.on_cuda_check: Callable[[], bool] | None = None
        self.steps_failed = 0

    # -- the context ---------------------------------------------------------------
    def __enter__(self) -> StepTracker:
        if self.depth:
            self.depth += 1
            return self
        self.depth = 1
        if not self.enabled:
            return self
        c = self.clock
        c.owner = _get_ident()
        acc = c.acc
        self.pending = acc[DATALOADER] + acc[H2D]
        acc[FORWARD] = acc[BACKWARD] = acc[OPTIMIZER] = 0
        c.opt_depth = 0
        if self.on_cuda_check is not None and not self.on_cuda_check():
            self.on_cuda_check = None
        if self.gpu is not None:
            self.gpu.step_begin()
        if self.memory is not None:
            self.memory.step_begin()
        self.t0 = _perf_ns()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        t1 = _perf_ns()
        if self.depth > 1:
            self.depth -= 1
            return False
        self.depth = 0
        if self.enabled:
            try:
                self._record(t1, exc_type is not None)
            except Exception:
                self.enabled = False
                disable_piece("step", "step timing (trace_step)")
        return False  # never swallow the user's exception

    def _record(self, t1: int, failed: bool) -> None:
        c = self.clock
        acc = c.acc
        if c.phase == OPTIMIZER:  # optimizer.step raised: its post-hook never ran
            acc[OPTIMIZER] += t1 - c.opt_t0
            c.phase = NO_PHASE
            if c.gpu is not None:
                c.gpu.end(OPTIMIZER)
        c.opt_depth = 0
        step = self.step
        ts = _wall_ns()
        dl = acc[0] // 1000
        h2d = acc[1] // 1000
        fwd = acc[2] // 1000
        bwd = acc[3] // 1000
        opt = acc[4] // 1000
        acc[0] = acc[1] = acc[2] = acc[3] = acc[4] = 0
        step_us = (self.pending + t1 - self.t0) // 1000
        residual = step_us - dl - h2d - fwd - bwd - opt
        if residual < 0:
            residual = 0
        self.step_table.append((step, ts, 1 if failed else 0, step_us, dl, h2d, fwd, bwd, opt, residual))
        if failed:
            self.steps_failed += 1
        self.step = step + 1
        if self.regions:
            self._flush_regions(step, ts)
        if self.gpu is not None:
            self.gpu.step_end(step, ts)
        if self.memory is not None:
            self.memory.step_end(step, ts)

    # -- regions -------------------------------------------------------------------
    def add_region(self, name: str, ns: int) -> None:
        """Account one ``trace_time`` region call of ``ns`` nanoseconds."""
        if self.depth and _get_ident() == self.clock.owner:
            r = self.regions.get(name)
            if r is None:
                self.regions[name] = [ns, 1]
            else:
                r[0] += ns
                r[1] += 1
        else:
            # outside a step (or on another thread): one row per call, step = -1
            self.region_table.append((-1, _wall_ns(), name, ns // 1000, 1))

    def _flush_regions(self, step: int, ts: int) -> None:
        append = self.region_table.append
        for name, (ns, calls) in self.regions.items():
            append((step, ts, name, ns // 1000, calls))
        self.regions.clear()


class Region:
    """``trace_time(name)``: a context manager and a decorator timing a user region.

    Inside a step, calls are summed per name into one STEP_REGION row at step end; outside
    a step each call becomes its own row with ``step = -1``.
    """

    __slots__ = ("name", "_starts", "_resolve")

    def __init__(self, name: str, resolve: Callable[[], StepTracker | None]) -> None:
        self.name = str(name)
        self._starts: list[int] = []
        self._resolve = resolve

    def __enter__(self) -> Region:
        self._starts.append(_perf_ns())
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        t1 = _perf_ns()
        try:
            t0 = self._starts.pop()
            tracker = self._resolve()
            if tracker is not None and tracker.enabled:
                tracker.add_region(self.name, t1 - t0)
        except Exception:
            disable_piece("region", "trace_time region timing")
        return False

    def __call__(self, fn: F) -> F:
        import functools

        name = self.name
        resolve = self._resolve

        @functools.wraps(fn)
        def traceml_region(*args: Any, **kwargs: Any) -> Any:
            t0 = _perf_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = _perf_ns()
                try:
                    tracker = resolve()
                    if tracker is not None and tracker.enabled:
                        tracker.add_region(name, t1 - t0)
                except Exception:
                    disable_piece("region", "trace_time region timing")

        return traceml_region  # type: ignore[return-value]
