"""The hot path: the phase clock and ``trace_step``'s context (the phase wrappers: :mod:`.timed`; regions: :mod:`.regions`).

Runs on the training thread: only ``perf_counter_ns``, integer arithmetic and one append per step;
phases never overlap, so ``residual = step - sum(phases) >= 0``.  Attribution rules: docs/internals.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import GetSetDescriptorType, MemberDescriptorType, ModuleType, TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

from traceml.runtime._failopen import disable_piece
from traceml.runtime.steprows import YIELD_EVERY, YIELD_S, StepRows, pack_row
from traceml.store import BoundedTable

_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns
_get_ident = threading.get_ident
_sleep = time.sleep


#: phase indices into PhaseClock.acc (same order as traceml.schema.PHASES, residual excluded)
DATALOADER, H2D, FORWARD, BACKWARD, OPTIMIZER = range(5)
NO_PHASE = -1
#: phases whose time spent between steps is carried into the next step
CARRIED_PHASES = (DATALOADER, H2D)

#: PhaseClock.gate bits.  CARRY: dataloader and h2d are timed; STEP: forward, backward and
#: the optimizer are timed (inside a step); SAMPLE: this step measures traceml's own time.
#: A running phase closes the gate (0) until it ends.
CARRY, STEP, SAMPLE = 1, 2, 4
#: one step in this many (and step 1) measures traceml's own time, for the first SAMPLE_WARM steps
SAMPLE_EVERY = 64
#: then one in SAMPLE_EVERY_LATER (the C fast path has the same numbers, see _load_fast)
SAMPLE_WARM = 4096
SAMPLE_EVERY_LATER = 512
#: the sampled steps are the odd ones 1 past each multiple: never a step of the host memory reader
#: (every 4th, 8th, ... step), whose rare slow path they would count as every step's cost
SAMPLE_OFFSET = 1


def sampled_step(step: int) -> bool:
    """Whether ``step`` measures traceml's own time (step 1, 65, 129, ...; after the warm-up 1 in 512)."""
    return step == 1 or (
        step > 1 and step % (SAMPLE_EVERY if step < SAMPLE_WARM else SAMPLE_EVERY_LATER) == SAMPLE_OFFSET
    )


def _load_fast() -> ModuleType | None:
    """The optional C fast path (``_fastclock.c``, built by ``pip install``), or None: not built,
    or ``TRACEML_PURE_PYTHON=1``.  This module stays the reference; C runs only the common case."""
    if os.environ.get("TRACEML_PURE_PYTHON", "").strip() not in ("", "0"):
        return None
    try:
        from traceml.runtime import _fastclock  # type: ignore[attr-defined]
    except ImportError:
        return None
    # its clock is CLOCK_MONOTONIC: only where perf_counter is the same clock
    if time.get_clock_info("perf_counter").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        return None
    # a stale build whose sampled steps differ from this module's: use the reference
    if getattr(_fastclock, "SAMPLING", None) != (SAMPLE_EVERY, SAMPLE_WARM, SAMPLE_EVERY_LATER, SAMPLE_OFFSET):
        return None
    # likewise its drain yield (steprows.py)
    if getattr(_fastclock, "YIELD", None) != (YIELD_EVERY, round(YIELD_S * 1e9)):
        return None
    return _fastclock


#: the C fast path in use (None: pure Python)
FAST: ModuleType | None = _load_fast()
if TYPE_CHECKING or FAST is None:
    _StepBase: type = object
    _ClockBase: type = object
else:
    _StepBase = FAST.StepContext
    _ClockBase = FAST.ClockCore


def native_slots(base: type, names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` less the fields the C base already holds (its integers and arrays, in C memory)."""
    fields = (MemberDescriptorType, GetSetDescriptorType)
    native = {k for k, v in vars(base).items() if isinstance(v, fields)} if base is not object else set()
    return tuple(n for n in names if n not in native)


#: loaders (other than the training one) whose fetches between two steps are kept apart
MAX_OTHER_SOURCES = 16
_ZEROS = (0, 0, 0, 0, 0)


class GpuPhaseTimer(Protocol):
    """What the clock needs from the CUDA event timer (:class:`traceml.runtime.cuda.GpuTimer`)."""

    def begin(self, phase: int) -> None: ...
    def end(self, phase: int) -> None: ...
    def cancel(self, phase: int) -> None: ...
    def step_begin(self) -> None: ...
    def step_end(self, step: int, ts_ns: int) -> None: ...


class StepMemory(Protocol):
    """Per-step memory rows.  Optional attributes: ``every`` (``step_end`` only on steps divisible
    by it; default 1; read when the object is set and again after each ``step_end``) and ``begins``
    (False: ``step_begin`` does nothing and is not called; default True; read once)."""

    def step_begin(self) -> None: ...
    def step_end(self, step: int, ts_ns: int) -> None: ...


class PhaseClock(_ClockBase):
    """Shared state of the phase patches and the step context (one per agent).

    ``owner`` is the training thread: phases are only timed there, so a prefetch thread
    that iterates a DataLoader does not count as the training loop waiting.  ``gate`` is
    what the patches read first; ``base`` is the gate while no phase runs.  With the C fast
    path its integer fields live in the C base (``_fastclock.ClockCore``).
    """

    __slots__ = native_slots(
        _ClockBase,
        (
            "_enabled",
            "owner",
            "gate",
            "base",
            "_phase",
            "acc",
            "first",
            "opt_depth",
            "opt_t0",
            *(("gpu",) if FAST is None else ("_gpu_obj",)),
            "self_ns",
            "train_src",
            "last_src",
            "train_seen",
            "fetched_in_step",
            "carry",
            "carry_first",
            "other",
        ),
    )

    def __init__(self) -> None:
        self._enabled = True
        self.owner = threading.main_thread().ident or 0
        self.base = CARRY
        self.gate = CARRY
        self._phase = NO_PHASE
        self.acc = [0, 0, 0, 0, 0]
        #: perf_counter_ns of each phase's first start in the current step (0: not yet)
        self.first = [0, 0, 0, 0, 0]
        self.opt_depth = 0
        self.opt_t0 = 0
        self.gpu: GpuPhaseTimer | None = None
        #: traceml's own ns on the training thread in the sampled step under way
        self.self_ns = 0
        #: the training loader (id of its dataset; 0 = not known yet / no loader)
        self.train_src = 0
        #: the loader of the latest fetch between steps (copies after it belong to it)
        self.last_src = 0
        #: the training loader was fetched from since the last step
        self.train_seen = False
        #: the last step fetched from a loader inside its body
        self.fetched_in_step = False
        #: carried towards the next step from the training loader (ns per phase, as ``acc``) and
        #: where each carried phase began (as ``first``); swapped with acc/first at step start
        self.carry = [0, 0, 0, 0, 0]
        self.carry_first = [0, 0, 0, 0, 0]
        #: the same for other loaders fetched between steps: {loader: [dl, h2d, dl t0, h2d t0]}
        self.other: dict[int, list[int]] = {}

    # -- compatibility with code that sets the phase or switches the clock off -------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        if not value:
            self.base = self.gate = 0
        elif not self.base:
            self.base = CARRY
            if self._phase == NO_PHASE:
                self.gate = CARRY

    @property
    def phase(self) -> int:
        return self._phase

    @phase.setter
    def phase(self, value: int) -> None:
        self._phase = value
        self.gate = 0 if value >= 0 else self.base

    def set_base(self, base: int) -> None:
        """The gate while no phase runs (the step context switches it at enter and exit)."""
        if not self._enabled:
            base = 0
        self.base = base
        if self._phase == NO_PHASE:
            self.gate = base

    # -- carried time ------------------------------------------------------------------
    def swap_carry(self) -> None:
        """At a step's start the carried time becomes the step's first phases: the accumulators
        (zeroed at the last step's end) and the carried ones change places (the C base swaps
        its arrays)."""
        self.carry, self.acc = self.acc, self.carry
        self.carry_first, self.first = self.first, self.carry_first

    def add_carried(self, phase: int, src: int | None, t0: int, dt: int) -> None:
        """A dataloader fetch (``src`` = its loader) or a copy (``src`` None: it belongs to the
        latest fetch) between steps."""
        if src is None:
            src = self.last_src
        else:
            self.last_src = src
        if src == self.train_src:
            if phase == DATALOADER:
                self.train_seen = True
            if not self.carry[phase]:
                self.carry_first[phase] = t0
            self.carry[phase] += dt
            return
        r = self.other.get(src)
        if r is None:
            if len(self.other) >= MAX_OTHER_SOURCES:
                return
            r = self.other[src] = [0, 0, 0, 0]
        if not r[phase]:
            r[phase + 2] = t0
        r[phase] += dt

    def settle_carried(self) -> None:
        """At step start, when other loaders were fetched since the last step: decide which
        loader is the training one (see the module docstring) and forget the others."""
        other = self.other
        if not self.train_seen and not self.fetched_in_step:
            # no fetch from the known training loader: the loader fetched last is the training loader now
            adopted = other.get(self.last_src)
            if adopted is not None:
                self.train_src = self.last_src
                c, f = self.carry, self.carry_first
                c[DATALOADER], f[DATALOADER] = adopted[0], adopted[2]
                if adopted[1] or not c[H2D]:  # else: copies made before any fetch stay
                    c[H2D], f[H2D] = adopted[1], adopted[3]
        other.clear()

    def forget_carried(self) -> None:
        """Drop everything carried towards the next step (an integration's exclusion window)."""
        c, f = self.carry, self.carry_first
        c[0] = c[1] = c[2] = c[3] = c[4] = 0
        f[0] = f[1] = f[2] = f[3] = f[4] = 0
        self.other.clear()
        self.train_seen = False

    def carried_state(self) -> tuple[list[int], list[int], dict[int, list[int]], bool, int]:
        return (
            list(self.carry),
            list(self.carry_first),
            {k: list(v) for k, v in self.other.items()},
            self.train_seen,
            self.last_src,
        )

    def restore_carried(self, state: tuple[list[int], list[int], dict[int, list[int]], bool, int]) -> None:
        carry, first, other, seen, last = state
        self.carry[:] = carry
        self.carry_first[:] = first
        self.other = {k: list(v) for k, v in other.items()}
        self.train_seen = seen
        self.last_src = last


class StepTracker(_StepBase):
    """``with trace_step(model):`` — one STEP_TIME row per step, regions, GPU/memory hand-off.

    One instance per agent, re-entered every step.  The training thread appends one raw tuple
    per step (perf-counter nanoseconds, see :class:`StepRows`) and allocates nothing else; the
    sender thread turns the rows into STEP_TIME and STEP_TIMELINE columns.  A nested
    ``trace_step`` (say an integration plus the user's own) counts as the same step.
    """

    __slots__ = native_slots(
        _StepBase,
        (
            "clock",
            "step_table",
            "region_table",
            "step",
            "depth",
            "t0",
            "pending",
            "regions",
            "_gpu",
            "_memory",
            "_mem_begin",
            "_mem_every",
            "_enabled",
            "_on_cuda_check",
            "_rare",
            "_slow_at",
            "_direct",
            "steps_failed",
            "sampled",
            "enter_ns",
            "cost_ns",
            "cost_steps",
            "rare_ns",
        ),
    )

    def __init__(self, clock: PhaseClock, step_table: BoundedTable, region_table: BoundedTable) -> None:
        self.clock = clock
        self.step_table = step_table
        self.region_table = region_table
        #: index of the current (or next) step; every rank counts its own from 0
        self.step = 0
        self.depth = 0
        self.t0 = 0
        #: carried time (ns) the current step began with
        self.pending = 0
        self.regions: dict[str, list[int]] = {}
        self._gpu: GpuPhaseTimer | None = None
        self._memory: StepMemory | None = None
        self._mem_begin: Callable[[], None] | None = None
        self._mem_every = 1
        self._enabled = True
        #: called at step start until it returns False (the agent's "is CUDA in use yet?" probe)
        self._on_cuda_check: Callable[[], bool] | None = None
        #: the rows go straight into the deque of a StepRows table (no method call per step)
        self._direct = isinstance(step_table, StepRows)
        #: something on every step needs the full enter/exit (GPU, CUDA probe, memory begins, off)
        self._rare = not self._direct
        #: the next step whose exit needs the full path (sampling, memory rows); see _plan
        self._slow_at = 0
        self.steps_failed = 0
        self.sampled = 0
        self.enter_ns = 0
        #: traceml's own ns on the training thread, summed over the sampled steps
        self.cost_ns = 0
        self.cost_steps = 0
        #: traceml's ns on the steps that read memory (not sampled: the sampled steps never are one)
        self.rare_ns = 0

    # -- what makes a step take the full path (see __enter__) ---------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        self._replan()

    @property
    def on_cuda_check(self) -> Callable[[], bool] | None:
        return self._on_cuda_check

    @on_cuda_check.setter
    def on_cuda_check(self, check: Callable[[], bool] | None) -> None:
        self._on_cuda_check = check
        self._replan()

    @property
    def gpu(self) -> GpuPhaseTimer | None:
        return self._gpu

    @gpu.setter
    def gpu(self, timer: GpuPhaseTimer | None) -> None:
        self._gpu = timer
        self._replan()

    def _replan(self) -> None:
        """Something rare changed: the next enter and exit take the full path, which re-plans."""
        self._rare = (
            not self._enabled
            or not self._direct
            or self._on_cuda_check is not None
            or self._gpu is not None
            or self._mem_begin is not None
        )
        self._slow_at = self.step

    def _plan(self, nxt: int) -> None:
        """After the exit of step ``nxt - 1``: the first step from ``nxt`` on whose exit needs the
        full path -- the one before a sampled step (it arms the sample; in pure Python only), or a
        memory step."""
        if self._rare:
            self._slow_at = nxt
            return
        if FAST is None:
            every = SAMPLE_EVERY if nxt + SAMPLE_EVERY < SAMPLE_WARM else SAMPLE_EVERY_LATER
            at = nxt + (SAMPLE_OFFSET - 1 - nxt) % every  # its exit makes the next step sampled
        else:
            at = 1 << 62  # the C exit arms sampled steps itself (the same sampled_step rule)
        if self._memory is not None and not self._memory_in_c():  # else the C exit reads it itself
            every = self._mem_every
            at = min(at, nxt + (-nxt) % every)
        self._slow_at = at

    def _memory_in_c(self) -> bool:
        """The C exit reads this memory itself (hostmem.HostStepMemory on its C base, ``StatmCore``)."""
        return FAST is not None and isinstance(self._memory, FAST.StatmCore)

    @property
    def memory(self) -> StepMemory | None:
        """Per-step memory rows (host RSS every few steps, or CUDA peaks), None: none."""
        return self._memory

    @memory.setter
    def memory(self, memory: StepMemory | None) -> None:
        self._memory = memory
        self._mem_every = max(1, int(getattr(memory, "every", 1))) if memory is not None else 1
        self._mem_begin = memory.step_begin if memory is not None and getattr(memory, "begins", True) else None
        self._replan()

    # -- the context ---------------------------------------------------------------
    def __enter__(self) -> StepTracker:
        c = self.clock
        if self.depth or self._rare or c.gate != CARRY or c.other:
            return self._enter_full()
        # the common step: not nested, not sampled, no GPU timer, CUDA probe or memory begin,
        # no other loader fetched since the last step (same work as _enter_full, fewer tests)
        self.depth = 1
        c.owner = _get_ident()
        c.swap_carry()
        acc = c.acc
        self.pending = acc[0] + acc[1]
        c.train_seen = c.fetched_in_step = False
        c.opt_depth = 0
        c.base = c.gate = CARRY | STEP
        self.t0 = _perf_ns()
        return self

    def _enter_full(self) -> StepTracker:
        if self.depth:
            self.depth += 1
            return self
        self.depth = 1
        if not self._enabled:
            return self
        c = self.clock
        sampled = self.sampled = c.base & SAMPLE
        te = _perf_ns() if sampled else 0
        c.owner = _get_ident()
        if c.other:
            c.settle_carried()
        c.swap_carry()
        acc = c.acc
        self.pending = acc[0] + acc[1]
        c.train_seen = False
        c.fetched_in_step = False
        c.opt_depth = 0
        if self._on_cuda_check is not None and not self._on_cuda_check():
            self.on_cuda_check = None
        if self._gpu is not None:
            self._gpu.step_begin()
        if self._mem_begin is not None:
            self._mem_begin()
        c._phase = NO_PHASE
        c.base = c.gate = CARRY | STEP | sampled if c._enabled else 0
        t0 = self.t0 = _perf_ns()
        if sampled:
            self.enter_ns = t0 - te
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        t1 = _perf_ns()
        c = self.clock
        step = self.step
        # gate == CARRY | STEP: no phase open, not sampled, the clock on
        if self.depth != 1 or c.gate != CARRY | STEP or exc_type is not None or step >= self._slow_at:
            return self._exit_full(t1, exc_type)
        try:
            self.depth = 0
            c.opt_depth = 0
            self.step = step + 1
            c.base = c.gate = CARRY
            acc = c.acc
            f = c.first
            # raw: converted (µs, wall clock, offsets) off this thread by StepRows
            row = pack_row(step, 0, self.t0 - self.pending, t1, *acc, *f)
            acc[:] = f[:] = _ZEROS
            # StepRows.append inline (one writer; deque.append is atomic; see StepRows)
            table: StepRows = self.step_table  # type: ignore[assignment]  # _rare when it is not
            rows = table._rows
            rows.append(row)
            table.appended += 1
            n = len(rows)
            if n == table._high_water:
                table.wake()
            elif n > table._high_water and not table.appended % YIELD_EVERY:  # every 64th row at most
                _sleep(YIELD_S)  # the sender is behind: let it drain
        except Exception:
            self._fail()
        return False

    def _exit_full(self, t1: int, exc_type: type[BaseException] | None) -> Literal[False]:
        if self.depth > 1:
            self.depth -= 1
            return False
        self.depth = 0
        if not self._enabled:
            c = self.clock
            c.set_base(CARRY)  # a step closed without a row: forward & co. are not timed
            f = c.first
            f[0] = f[1] = f[2] = f[3] = f[4] = 0
            return False
        try:
            failed = exc_type is not None
            c = self.clock
            acc = c.acc
            if c._phase == OPTIMIZER:  # optimizer.step raised: its post-hook never ran
                acc[OPTIMIZER] += t1 - c.opt_t0
                if c.gpu is not None:
                    c.gpu.end(OPTIMIZER)
            c._phase = NO_PHASE
            c.opt_depth = 0
            step = self.step
            nxt = self.step = step + 1
            c.base = c.gate = (CARRY | SAMPLE if sampled_step(nxt) else CARRY) if c._enabled else 0
            self._plan(nxt)
            f = c.first
            start = self.t0 - self.pending
            # raw: converted (µs, wall clock, offsets) off this thread by StepRows
            self.step_table.append(pack_row(step, failed, start, t1, *acc, *f))
            acc[:] = f[:] = _ZEROS
            if failed:
                self.steps_failed += 1
            mem = self._memory
            if mem is not None and self._memory_in_c():  # the C exits adapt its stride: read it afresh
                self._mem_every = max(1, int(mem.every))  # type: ignore[attr-defined]
            if mem is not None and step % self._mem_every:
                mem = None  # not a step it reads
            if self.regions or self._gpu is not None or mem is not None:
                ts = _wall_ns()
                if self.regions:
                    self._flush_regions(step, ts, start)
                if self._gpu is not None:
                    self._gpu.step_end(step, ts)
                if mem is not None:
                    mem.step_end(step, ts)
                    every = mem.every if hasattr(mem, "every") else 1
                    if every != self._mem_every:  # the memory reader adapted its stride
                        self._mem_every = max(1, int(every))
                        self._plan(nxt)
            if self.sampled:
                self.cost_ns += _perf_ns() - t1 + self.enter_ns + c.self_ns
                self.cost_steps += 1
                c.self_ns = 0
                self.sampled = 0
            elif mem is not None and not self._rare:  # a memory step: its slow exit counted once
                self.rare_ns += _perf_ns() - t1
        except Exception:
            self._fail()
        return False  # never swallow the user's exception

    def _fail(self) -> None:
        self.enabled = False
        self.clock.set_base(CARRY)
        disable_piece("step", "step timing (trace_step)")

    # -- regions -------------------------------------------------------------------
    def add_region(self, name: str, ns: int, t0: int = 0) -> None:
        """Account one ``trace_time`` region call of ``ns`` nanoseconds that began at ``t0``
        (``perf_counter_ns``; 0 = unknown)."""
        if self.depth and _get_ident() == self.clock.owner:
            r = self.regions.get(name)
            if r is None:
                self.regions[name] = [ns, 1, t0]
                self._slow_at = self.step  # this step's exit writes the region rows
            else:
                r[0] += ns
                r[1] += 1
        else:
            # outside a step (or on another thread): one row per call, step = -1
            self.region_table.append((-1, _wall_ns(), name, ns // 1000, 1, -1))

    def _flush_regions(self, step: int, ts: int, start: int) -> None:
        append = self.region_table.append
        for name, (ns, calls, t0) in self.regions.items():
            append((step, ts, name, ns // 1000, calls, max((t0 - start) // 1000, 0) if t0 else -1))
        self.regions.clear()


if FAST is not None:
    # the C base holds the arrays (swap_carry swaps them) and a flag the wrappers read for ``gpu``
    del PhaseClock.swap_carry

    def _get_gpu(self: PhaseClock) -> GpuPhaseTimer | None:
        return self._gpu_obj  # type: ignore[attr-defined, no-any-return]

    def _set_gpu(self: PhaseClock, timer: GpuPhaseTimer | None) -> None:
        self._gpu_obj = timer  # type: ignore[attr-defined]
        self._gpu_on = timer is not None  # type: ignore[attr-defined]

    PhaseClock.gpu = property(_get_gpu, _set_gpu)  # type: ignore[assignment]

#: the pure-Python context (the reference the tests compare the C one with)
PY_ENTER, PY_EXIT = StepTracker.__enter__, StepTracker.__exit__
if FAST is not None:
    # the C base's __enter__/__exit__: the same common path (_fastclock.c), the rest calls
    # _enter_full/_exit_full above
    delattr(StepTracker, "__enter__")
    delattr(StepTracker, "__exit__")
