"""``trace_input``: any function, iterator or block marked as the input phase (dataloader time).

Counted exactly like a DataLoader wait (outermost phase only); a pass-through when traceml is off.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

from traceml.runtime._failopen import disable_piece
from traceml.runtime.step import DATALOADER, NO_PHASE, STEP, PhaseClock

_perf_ns = time.perf_counter_ns
_get_ident = threading.get_ident

T = TypeVar("T")


def _begin(clock: PhaseClock | None) -> int:
    """Start timing the input phase; returns t0, or -1 when this call is not the one timed."""
    if clock is None or clock.phase >= 0 or not clock.enabled or _get_ident() != clock.owner:
        return -1
    clock.phase = DATALOADER
    return _perf_ns()


def _end(clock: PhaseClock | None, t0: int) -> None:
    if t0 < 0 or clock is None:
        return
    try:
        dt = _perf_ns() - t0
        clock.phase = NO_PHASE
        if clock.base & STEP:  # inside a step
            clock.acc[DATALOADER] += dt
            if not clock.first[DATALOADER]:
                clock.first[DATALOADER] = t0
        else:  # between steps: carried, as the input of loader 0 ("not a DataLoader")
            clock.add_carried(DATALOADER, 0, t0, dt)
    except Exception:
        disable_piece("trace-input", "input timing (trace_input)")


class InputBlock:
    """``with traceml.trace_input():`` -- the block is input time; also a decorator."""

    __slots__ = ("_resolve", "_starts")

    def __init__(self, resolve: Callable[[], PhaseClock | None]) -> None:
        self._resolve = resolve
        self._starts: list[tuple[PhaseClock | None, int]] = []

    def __enter__(self) -> InputBlock:
        clock = self._resolve()
        self._starts.append((clock, _begin(clock)))
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        if self._starts:
            clock, t0 = self._starts.pop()
            _end(clock, t0)
        return False

    def __call__(self, fn: Callable[..., T]) -> Callable[..., T]:
        return wrap_function(fn, self._resolve)


class InputIterator(Iterator[T]):
    """Each ``next()`` of the wrapped iterator is input time."""

    __slots__ = ("_it", "_resolve")

    def __init__(self, it: Iterator[T], resolve: Callable[[], PhaseClock | None]) -> None:
        self._it = it
        self._resolve = resolve

    def __iter__(self) -> InputIterator[T]:
        return self

    def __next__(self) -> T:
        clock = self._resolve()
        t0 = _begin(clock)
        try:
            return next(self._it)
        finally:
            _end(clock, t0)


class InputIterable(Iterable[T]):
    """A re-iterable (a DataLoader, a dataset) whose every iteration is timed."""

    __slots__ = ("_iterable", "_resolve")

    def __init__(self, iterable: Iterable[T], resolve: Callable[[], PhaseClock | None]) -> None:
        self._iterable = iterable
        self._resolve = resolve

    def __iter__(self) -> InputIterator[T]:
        return InputIterator(iter(self._iterable), self._resolve)

    def __len__(self) -> int:
        return len(self._iterable)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterable, name)


def wrap_function(fn: Callable[..., T], resolve: Callable[[], PhaseClock | None]) -> Callable[..., T]:
    """Time each call of ``fn``; a generator function has each of its ``next()`` timed instead."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def traceml_input_gen(*args: Any, **kwargs: Any) -> Any:
            return InputIterator(fn(*args, **kwargs), resolve)

        return traceml_input_gen

    @functools.wraps(fn)
    def traceml_input(*args: Any, **kwargs: Any) -> T:
        clock = resolve()
        t0 = _begin(clock)
        try:
            return fn(*args, **kwargs)
        finally:
            _end(clock, t0)

    return traceml_input


def mark_input(obj: Any, resolve: Callable[[], PhaseClock | None]) -> Any:
    """What ``trace_input(obj)`` returns for a non-None ``obj`` (see :func:`traceml.trace_input`)."""
    if callable(obj):
        return wrap_function(obj, resolve)
    if isinstance(obj, Iterator):
        return InputIterator(obj, resolve)
    if isinstance(obj, Iterable):
        return InputIterable(obj, resolve)
    raise TypeError(
        f"traceml.trace_input expected a function, an iterator or an iterable (or no argument for a "
        f"`with` block); got {type(obj).__name__}"
    )
