"""The phase wrappers: a call timed into the step's phase (forward, backward, optimizer) or carried
towards the next step (a dataloader fetch, a host-to-device copy).  Pure Python is the reference; the
C fast path (``_fastclock.c``) runs their common case."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from traceml.runtime.step import (
    CARRIED_PHASES,
    DATALOADER,
    FAST,
    H2D,
    NO_PHASE,
    SAMPLE,
    STEP,
    PhaseClock,
    _get_ident,
    _perf_ns,
)


def _sampled_step_phase(c: PhaseClock, phase: int, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    te = _perf_ns()
    c._phase = phase
    c.gate = 0
    g = c.gpu
    if g is not None:
        g.begin(phase)
    t0 = _perf_ns()
    try:
        return fn(*args, **kwargs)
    finally:
        t1 = _perf_ns()
        c.acc[phase] += t1 - t0
        f = c.first
        if not f[phase]:
            f[phase] = t0
        c._phase = NO_PHASE
        c.gate = c.base
        if g is not None:
            g.end(phase)
        c.self_ns += _perf_ns() - t1 + t0 - te


def timed(clock: PhaseClock, phase: int, fn: Callable[..., Any], gpu: bool = True) -> Callable[..., Any]:
    """Wrap ``fn`` so its outermost calls on the training thread add to ``clock.acc[phase]``.

    Forward, backward and the optimizer are timed inside a step only; dataloader and h2d
    also between steps (carried, see the module docstring).  ``gpu`` = False: never on the
    CUDA event timer.
    """
    if phase in CARRIED_PHASES:
        return timed_carried(clock, phase, fn, source=None if phase == H2D else _no_source, gpu=gpu)
    full = _timed_py(clock, phase, fn)
    if FAST is None:
        return full
    fast = FAST.Timed(clock, phase, fn, full)  # the common case in C, the rest is `full`
    fast.__name__ = full.__name__
    fast.__doc__ = full.__doc__
    return fast  # type: ignore[no-any-return]


def _timed_py(clock: PhaseClock, phase: int, fn: Callable[..., Any]) -> Callable[..., Any]:
    def traceml_timed(*args: Any, **kwargs: Any) -> Any:
        c = clock
        g = c.gate
        if not g & STEP or _get_ident() != c.owner:
            return fn(*args, **kwargs)
        if g & SAMPLE:
            return _sampled_step_phase(c, phase, fn, args, kwargs)
        c._phase = phase
        c.gate = 0
        gp = c.gpu
        if gp is not None:
            gp.begin(phase)
        t0 = _perf_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            c.acc[phase] += _perf_ns() - t0
            f = c.first
            if not f[phase]:
                f[phase] = t0
            c._phase = NO_PHASE
            c.gate = c.base
            if gp is not None:
                gp.end(phase)

    traceml_timed.__wrapped__ = fn  # type: ignore[attr-defined]
    traceml_timed.__name__ = getattr(fn, "__name__", "traceml_timed")
    traceml_timed.__doc__ = getattr(fn, "__doc__", None)
    return traceml_timed


def _no_source(*args: Any) -> int:
    return 0


def timed_carried(
    clock: PhaseClock,
    phase: int,
    fn: Callable[..., Any],
    source: Callable[[Any], int] | None,
    gpu: bool = True,
    accept: Callable[[Any, Any], bool] | None = None,
) -> Callable[..., Any]:
    """Wrap a dataloader fetch (``source(first_arg)`` names its loader) or a copy (``source``
    None); inside a step it adds to the step, between steps it is carried.  ``accept(first_arg,
    result)`` says whether the call counts at all (a copy that stayed on the host does not)."""

    def traceml_carried(*args: Any, **kwargs: Any) -> Any:
        c = clock
        g = c.gate
        if not g or _get_ident() != c.owner:
            return fn(*args, **kwargs)
        te = _perf_ns() if g & SAMPLE else 0
        c._phase = phase
        c.gate = 0
        gp = c.gpu if gpu else None
        if gp is not None:
            gp.begin(phase)
        t0 = _perf_ns()
        try:
            out = fn(*args, **kwargs)
        except BaseException:  # StopIteration at the end of an epoch too: not counted
            c._phase = NO_PHASE
            c.gate = c.base
            if gp is not None:
                gp.cancel(phase)
            if te:
                c.self_ns += t0 - te
            raise
        t1 = _perf_ns()
        c._phase = NO_PHASE
        c.gate = c.base
        if accept is not None and not accept(args[0] if args else None, out):
            if gp is not None:
                gp.cancel(phase)
        else:
            if g & STEP:
                c.acc[phase] += t1 - t0
                f = c.first
                if not f[phase]:
                    f[phase] = t0
                if source is not None:
                    c.fetched_in_step = True
                    c.train_src = source(args[0] if args else None)
            else:  # between steps: carried (inline for the training loader, see add_carried)
                if source is None:
                    src = c.last_src
                else:
                    src = c.last_src = source(args[0] if args else None)
                if src == c.train_src:
                    if phase == DATALOADER:
                        c.train_seen = True
                    cr = c.carry
                    if not cr[phase]:
                        c.carry_first[phase] = t0
                    cr[phase] += t1 - t0
                else:
                    c.add_carried(phase, src, t0, t1 - t0)
            if gp is not None:
                gp.end(phase)
        if te:
            c.self_ns += _perf_ns() - t1 + t0 - te
        return out

    traceml_carried.__wrapped__ = fn  # type: ignore[attr-defined]
    traceml_carried.__name__ = getattr(fn, "__name__", "traceml_carried")
    traceml_carried.__doc__ = getattr(fn, "__doc__", None)
    return traceml_carried
