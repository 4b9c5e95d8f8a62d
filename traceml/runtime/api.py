"""The user-facing functions: ``init``, ``shutdown``, ``trace_step``, ``trace_time``.

Fail-open: a broken environment or telemetry bug is logged once and turns traceml into a no-op;
only bad *arguments* to :func:`init` raise (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, TypeVar

from traceml.config import rank_config_from_env
from traceml.errors import ConfigError
from traceml.runtime._failopen import disable_piece, log_once
from traceml.runtime.agent import Agent
from traceml.runtime.inputs import InputBlock, mark_input
from traceml.runtime.regions import Region
from traceml.runtime.step import FAST, PhaseClock, StepTracker

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.RLock()
_agent: Agent | None = None
#: None = not decided yet; True = TRACEML_DISABLED, a broken environment, or a forked child
_off: bool | None = None


class _NoStep:
    """What ``trace_step`` returns when traceml is off: costs one attribute lookup."""

    step = -1

    def __enter__(self) -> _NoStep:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        return False


class _NoRegion:
    def __enter__(self) -> _NoRegion:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        return False

    def __call__(self, fn: F) -> F:
        return fn


_NO_STEP = _NoStep()
_NO_REGION = _NoRegion()


def _check_interval(interval: float | None) -> float | None:
    if interval is None:
        return None
    try:
        value = float(interval)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"interval={interval!r}: expected a number of seconds, e.g. interval=1.0") from exc
    if not value > 0:
        raise ConfigError(f"interval={interval!r}: expected a positive number of seconds, e.g. interval=1.0")
    return value


def init(
    out: str | os.PathLike[str] | None = None,
    interval: float | None = None,
    *,
    h2d: bool | None = None,
    script: str | None = None,
    start: bool = True,
    auto_steps: bool = False,
) -> Agent | None:
    """Start traceml in this process (optional: the first ``trace_step`` does it too).

    Reads :func:`traceml.config.rank_config_from_env`.  Under ``traceml run`` the agent
    streams to the aggregator; ``out`` (or ``TRACEML_OUT``) also records this rank to a
    ``.tml`` file; with neither, nothing leaves the process.  ``interval`` overrides
    ``TRACEML_INTERVAL`` (seconds between samples).  ``h2d`` forces host-to-device timing on
    or off (default: on where CUDA is available).  Returns the agent, or None when traceml
    is disabled (``TRACEML_DISABLED=1``) or could not start (logged).  Calling it again while
    running returns the running agent.  ``auto_steps=True`` cuts an uninstrumented loop into
    steps at each ``optimizer.step()`` (what ``traceml run`` does; see
    :mod:`traceml.runtime.autostep`); ``TRACEML_NO_AUTO_STEPS=1`` turns it off, and the first
    ``trace_step`` takes over from it.
    """
    global _agent, _off
    interval_s = _check_interval(interval)
    out_path = os.fspath(out) if out is not None else None
    with _lock:
        if _agent is not None and not _agent.closed:
            if out_path is not None and out_path != _agent.out:
                log_once(
                    "init-twice",
                    "traceml.init(out=%r) ignored: traceml is already running (out=%r); call traceml.shutdown() first",
                    out_path,
                    _agent.out,
                )
            return _agent
        try:
            cfg = rank_config_from_env()
            if cfg.disabled:
                _off = True
                return None
            if interval_s is not None:
                cfg = dataclasses.replace(cfg, interval_s=interval_s)
            _disarm()
            _agent = Agent(
                cfg, out=out_path, h2d=h2d, script=script, start=start, auto_steps=bool(auto_steps) and cfg.auto_steps
            )
            _agent.on_model_change = _disarm
            _off = False
            return _agent
        except Exception:
            _off = True
            disable_piece("init", "starting traceml (check the TRACEML_* and torchrun environment variables)")
            return None


def shutdown() -> None:
    """Remove every patch and hook, flush and stop the threads (bounded), send rank_finished.

    Runs at exit on its own; safe to call twice.  ``init`` (or ``trace_step``) afterwards
    starts a fresh agent.
    """
    global _agent, _off
    with _lock:
        agent, _agent = _agent, None
        _off = None
        _disarm()
    if agent is not None:
        try:
            agent.close()
        except Exception:
            disable_piece("shutdown", "shutting traceml down")


def current_agent() -> Agent | None:
    """The running agent, starting one from the environment if none was started yet."""
    agent = _agent
    if agent is not None:
        return agent
    if _off:
        return None
    init()
    return _agent


def mark_failed() -> None:
    """Record that the script ended with an uncaught exception (rank_finished says "failed")."""
    agent = _agent
    if agent is not None:
        agent.mark_failed()


def _trace_step(model: Any = None) -> StepTracker | _NoStep:
    """``with traceml.trace_step(model):`` marks one training step.

    Records one ``step_time`` row per step: the wall time and the dataloader, h2d,
    forward, backward, optimizer and residual phases (µs).  ``model`` is the model called
    in the step (plain, DDP/FSDP-wrapped or ``torch.compile``'d); without it the forward
    time falls into the residual.  Time spent in ``next()`` on the training DataLoader (and
    copies of its batch to the device) *before* entering the block is carried into the step;
    fetches from other loaders between steps (an evaluation pass) are not.  A step whose body
    raises is recorded with ``failed=1`` and the exception propagates unchanged.
    """
    agent = _agent if _agent is not None else current_agent()
    if agent is None:
        return _NO_STEP
    auto = agent.autostep
    if (model is None or model is agent._model) and (auto is None or not auto.active):
        if _entry is not None:  # from the next call on, this case runs in C
            _entry.arm(agent.tracker, agent._model)
        return agent.tracker  # every step after the first: what step_context would return, one call less
    try:
        return agent.step_context(model)
    except Exception:
        disable_piece("trace-step", "trace_step")
        return _NO_STEP


#: the C fast path's entry (``_fastclock.StepEntry``): the common case above without a Python frame
_entry: Any = None
if FAST is not None:
    _entry = FAST.StepEntry(_trace_step)
    functools.update_wrapper(_entry, _trace_step)
    _entry.__name__ = _entry.__qualname__ = "trace_step"
#: ``with traceml.trace_step(model):`` (see :func:`_trace_step`)
trace_step: Callable[..., StepTracker | _NoStep] = _entry if _entry is not None else _trace_step


def _disarm() -> None:
    """The agent changes (init, shutdown, a forked child): every trace_step goes through Python again."""
    if _entry is not None:
        _entry.disarm()


def _tracker() -> StepTracker | None:
    agent = _agent if _agent is not None else current_agent()
    return agent.tracker if agent is not None else None


def trace_time(name: str) -> Region | _NoRegion:
    """Time a named region, as ``with traceml.trace_time("eval"):`` or ``@traceml.trace_time("eval")``.

    Inside a step, the region's time and call count are summed per step (one
    ``step_region`` row per name and step); outside any step each call is its own row
    with ``step = -1``.  Regions may overlap the standard phases.
    """
    if _off:
        return _NO_REGION
    return Region(name, _tracker)


def _clock() -> PhaseClock | None:
    if _off:
        return None
    agent = _agent if _agent is not None else current_agent()
    return agent.clock if agent is not None else None


def trace_input(obj: Any = None) -> Any:
    """Mark input loading that is not a DataLoader as the dataloader phase.

    * ``with traceml.trace_input(): x, y = get_batch("train")`` -- the block;
    * ``@traceml.trace_input`` (or ``@traceml.trace_input()``) on a function -- each call
      (on a generator function: each ``next()``);
    * ``for batch in traceml.trace_input(stream):`` -- each ``next()`` of an iterator or iterable.

    The time counts as dataloader wait: carried into the next step when spent between steps,
    counted in the step when spent inside it.  Only the outermost phase is timed.
    """
    if obj is None:
        return InputBlock(_clock)
    return mark_input(obj, _clock)


def _after_fork_in_child() -> None:
    # a forked child (a DataLoader worker) must not time or send anything: the threads and the
    # socket belong to the parent
    global _agent, _off
    agent, _agent = _agent, None
    _off = True
    _disarm()
    if agent is not None:
        agent.clock.enabled = False
        agent.tracker.enabled = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
