"""``trace_time(name)`` regions: summed per step into STEP_REGION rows, or one row per call outside a step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from traceml import names
from traceml.runtime._failopen import disable_piece
from traceml.runtime.step import StepTracker, _perf_ns

F = TypeVar("F", bound=Callable[..., Any])


class Region:
    """``trace_time(name)``: a context manager and a decorator timing a user region.

    Inside a step, calls are summed per name into one STEP_REGION row at step end; outside
    a step each call becomes its own row with ``step = -1``.
    """

    __slots__ = ("name", "_starts", "_resolve")

    def __init__(self, name: str, resolve: Callable[[], StepTracker | None]) -> None:
        # a region name is a label (traceml.names): control characters would get its rows refused
        self.name = names.safe_label(name)
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
                tracker.add_region(self.name, t1 - t0, t0)
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
                        tracker.add_region(name, t1 - t0, t0)
                except Exception:
                    disable_piece("region", "trace_time region timing")

        return traceml_region  # type: ignore[return-value]
