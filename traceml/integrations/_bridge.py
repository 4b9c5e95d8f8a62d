"""The integrations' handle on the rank runtime: steps opened and closed at framework events.

The only module of ``traceml.integrations`` that touches runtime internals; every operation is fail-open
and a no-op when traceml is disabled.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from traceml.runtime import api, patches
from traceml.runtime._failopen import disable_piece, log_once
from traceml.runtime.step import FORWARD, H2D, NO_PHASE, OPTIMIZER, PhaseClock, StepTracker
from traceml.runtime.timed import timed

_perf_ns = time.perf_counter_ns
_get_ident = threading.get_ident


class _Mark:
    """What :meth:`StepDriver.rewind` goes back to."""

    __slots__ = ("acc", "carried", "ns", "gpu_pairs", "step", "open")

    def __init__(self, acc: list[int], carried: Any, ns: int, gpu_pairs: int, step: int, open_: bool) -> None:
        self.acc = acc
        self.carried = carried
        self.ns = ns
        self.gpu_pairs = gpu_pairs
        self.step = step
        self.open = open_


def _gpu_pairs(clock: PhaseClock) -> list[Any] | None:
    pairs = getattr(clock.gpu, "_pairs", None) if clock.gpu is not None else None
    return pairs if isinstance(pairs, list) else None


def _recycle_gpu_pairs(clock: PhaseClock, keep: int) -> None:
    """Drop the CUDA event pairs recorded after the first ``keep`` (back to the timer's pool)."""
    pairs = _gpu_pairs(clock)
    if pairs is None or len(pairs) <= keep:
        return
    pool = getattr(clock.gpu, "_pool", None)
    for pair in pairs[keep:]:
        if pool is not None:
            pool.append(pair[1])
            pool.append(pair[2])
    del pairs[keep:]


class StepDriver:
    """One Trainer's steps, driven by its callbacks (one driver per callback instance).

    ``name`` names the integration in log lines (``"huggingface"``, ``"lightning"``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._ctx: Any = None
        self._agent: Any = None
        self._mark: _Mark | None = None
        self._suspended = False
        self._off = False
        #: steps this driver closed with a row (completed or failed), and windows it discarded
        self.steps_closed = 0
        self.steps_discarded = 0
        self._owned: list[str] = []

    # -- plumbing --------------------------------------------------------------------
    def _fail(self, what: str) -> None:
        self._off = True
        disable_piece(f"integration-{self.name}", f"the {self.name} integration ({what})")
        ctx, self._ctx = self._ctx, None
        if ctx is not None:  # never leave the runtime inside a step nobody will close
            try:
                ctx.__exit__(None, None, None)
            except Exception:
                pass

    def _current(self) -> Any:
        """The running agent (started from the environment if needed), or None when off."""
        if self._off:
            return None
        agent = self._agent
        if agent is None or agent.closed:
            agent = self._agent = api.current_agent()
        return agent

    def _tracker(self) -> StepTracker | None:
        ctx = self._ctx
        return ctx if isinstance(ctx, StepTracker) else None

    @property
    def is_open(self) -> bool:
        """Whether this driver has a step open now."""
        return self._ctx is not None

    # -- steps -----------------------------------------------------------------------
    def begin(self, model: Any = None) -> None:
        """Open a step (no-op when one is open already).  ``model`` is the model the step calls."""
        if self._ctx is not None or self._off:
            return
        try:
            self._current()
            ctx = api.trace_step(model)
            ctx.__enter__()
            self._ctx = ctx
            self._suspended = False
        except Exception:
            self._fail("opening a step")

    def end(self, exc: BaseException | None = None) -> None:
        """Close the open step; with ``exc`` it is recorded as failed."""
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        try:
            self.resume_optimizer()
            if exc is None:
                ctx.__exit__(None, None, None)
            else:
                ctx.__exit__(type(exc), exc, exc.__traceback__)
            self.steps_closed += 1
        except Exception:
            self._fail("closing a step")

    def discard(self) -> None:
        """Close the open step WITHOUT a row: a window that never reached an optimizer step
        (training stopped in the middle of an accumulation window).  Its time and the time
        carried into it are forgotten."""
        ctx, self._ctx = self._ctx, None
        self._suspended = False
        if ctx is None:
            return
        tracker = ctx if isinstance(ctx, StepTracker) else None
        try:
            if tracker is None:
                ctx.__exit__(None, None, None)
                return
            enabled = tracker.enabled
            tracker.enabled = False  # __exit__ then closes without recording
            try:
                tracker.__exit__(None, None, None)
            finally:
                tracker.enabled = enabled
            if tracker.depth == 0:
                clock = tracker.clock
                clock.acc[:] = [0] * len(clock.acc)
                clock.opt_depth = 0
                if clock.phase != NO_PHASE:
                    clock.phase = NO_PHASE
                tracker.regions.clear()
                _recycle_gpu_pairs(clock, 0)
            self.steps_discarded += 1
        except Exception:
            self._fail("discarding an incomplete step")

    # -- carried time and exclusion windows ------------------------------------------------
    def reset_carried(self) -> None:
        """Forget dataloader and host-to-device time carried towards the next step (what ran
        before training started: a sanity check, an evaluation, the user's own loops), then mark."""
        agent = self._current()
        if agent is None or self._ctx is not None:
            self.mark()
            return
        try:
            clock: PhaseClock = agent.clock
            if clock.phase == NO_PHASE:
                clock.acc[:] = [0] * len(clock.acc)
                clock.forget_carried()
                _recycle_gpu_pairs(clock, 0)
        except Exception:
            self._fail("resetting carried time")
        self.mark()

    def prepare(self, model: Any) -> None:
        """Training is about to start with ``model`` (already on its device): let the runtime
        attach to it now.  The runtime decides on GPU timing when a step starts; deciding
        before the first batch is fetched lets the copies carried into the first step be
        timed on the GPU clock too."""
        agent = self._current()
        if agent is None or self._ctx is not None or model is None:
            return
        try:
            tracker = agent.step_context(model)
            check = getattr(tracker, "on_cuda_check", None)
            if check is not None and not check():
                tracker.on_cuda_check = None
        except Exception:
            self._fail("attaching to the model")

    def mark(self) -> None:
        """Remember the phase accumulators now; :meth:`rewind` returns to this point."""
        agent = self._current()
        if agent is None:
            return
        try:
            clock: PhaseClock = agent.clock
            pairs = _gpu_pairs(clock)
            tracker = self._tracker()
            self._mark = _Mark(
                list(clock.acc),
                clock.carried_state(),
                _perf_ns(),
                len(pairs) if pairs is not None else 0,
                tracker.step if tracker is not None else -1,
                self._ctx is not None,
            )
        except Exception:
            self._fail("marking")

    def rewind(self) -> None:
        """Forget everything timed since :meth:`mark` (an evaluation pass): carried dataloader
        and copy time, and -- when a step is open across it -- the elapsed time and phases."""
        mark = self._mark
        agent = self._current()
        if mark is None or agent is None:
            return
        try:
            clock: PhaseClock = agent.clock
            if clock.phase != NO_PHASE:
                return  # never inside a running phase
            tracker = self._tracker()
            is_open = self._ctx is not None
            if is_open != mark.open or (tracker is not None and tracker.step != mark.step):
                log_once(
                    f"integration-{self.name}-rewind",
                    "traceml: %s integration: evaluation did not start and end at the same step boundary; "
                    "its time is kept in the step",
                    self.name,
                )
                return
            now = _perf_ns()
            clock.acc[:] = mark.acc
            clock.restore_carried(mark.carried)
            if tracker is not None and tracker.depth:
                tracker.t0 += now - mark.ns  # the open step does not include the excluded time
            _recycle_gpu_pairs(clock, mark.gpu_pairs)
            mark.ns = now
        except Exception:
            self._fail("excluding an evaluation pass")

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """``with driver.excluded():`` nothing timed inside counts towards any training step."""
        self.mark()
        try:
            yield
        finally:
            self.rewind()

    # -- phases ----------------------------------------------------------------------
    def _suspend_optimizer(self, clock: PhaseClock) -> None:
        """Lightning runs forward and backward inside ``optimizer.step(closure)``: close the
        optimizer phase the step pre-hook opened; :meth:`resume_optimizer` reopens it."""
        now = _perf_ns()
        clock.acc[OPTIMIZER] += now - clock.opt_t0
        clock.phase = NO_PHASE
        if clock.gpu is not None:
            clock.gpu.end(OPTIMIZER)
        self._suspended = True

    def resume_optimizer(self) -> None:
        """The closure is done and the parameter update starts: time it as the optimizer again."""
        if not self._suspended:
            return
        self._suspended = False
        agent = self._agent
        if agent is None:
            return
        try:
            clock: PhaseClock = agent.clock
            if clock.phase == NO_PHASE and clock.opt_depth > 0:
                clock.phase = OPTIMIZER
                clock.opt_t0 = _perf_ns()
                if clock.gpu is not None:
                    clock.gpu.begin(OPTIMIZER)
        except Exception:
            self._fail("timing the optimizer step")

    def training_step(self, fn: Callable[..., Any], nests_phases: Callable[[], bool]) -> Callable[..., Any]:
        """Wrap ``fn`` (a framework's ``training_step``) to time it as the forward phase.

        Inside ``optimizer.step(closure)`` the optimizer phase is suspended first (Lightning).
        When ``nests_phases()`` says the step runs backward or the optimizer itself (manual
        optimization), those keep their own phases and forward is the rest: ``fn``'s time less
        the phases timed inside it, on the CPU clock only.  Otherwise ``fn`` is one forward
        phase, on the CPU and GPU clocks, as the runtime times a model's forward.
        """
        driver = self

        def traceml_training_step(*args: Any, **kwargs: Any) -> Any:
            agent = driver._agent
            if agent is None or driver._ctx is None or driver._off:
                return fn(*args, **kwargs)
            clock: PhaseClock = agent.clock
            if not clock.enabled or _get_ident() != clock.owner:
                return fn(*args, **kwargs)
            if clock.phase == OPTIMIZER and not driver._suspended:
                driver._suspend_optimizer(clock)
            elif clock.phase != NO_PHASE:
                return fn(*args, **kwargs)  # already inside a timed phase
            acc = clock.acc
            if nests_phases():
                before = acc[0] + acc[1] + acc[2] + acc[3] + acc[4]
                t0 = _perf_ns()
                try:
                    return fn(*args, **kwargs)
                finally:
                    own = _perf_ns() - t0 - (acc[0] + acc[1] + acc[2] + acc[3] + acc[4] - before)
                    if own > 0:
                        acc[FORWARD] += own
            clock.phase = FORWARD
            gpu = clock.gpu
            if gpu is not None:
                gpu.begin(FORWARD)
            t0 = _perf_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[FORWARD] += _perf_ns() - t0
                if not clock.first[FORWARD]:
                    clock.first[FORWARD] = t0
                clock.phase = NO_PHASE
                if gpu is not None:
                    gpu.end(FORWARD)

        traceml_training_step.__wrapped__ = fn  # type: ignore[attr-defined]
        return traceml_training_step

    def timed_h2d(self, fn: Callable[..., Any]) -> Callable[..., Any] | None:
        """``fn`` (a framework's "move this batch to the device") timed as host-to-device;
        None when traceml is off.  Outside a step the time is carried into the next one."""
        agent = self._current()
        if agent is None:
            return None
        return timed(agent.clock, H2D, fn)

    # -- patches owned by this integration ------------------------------------------------
    def patch(self, owner: Any, attr: str, replacement: Any, name: str) -> str | None:
        """Replace ``owner.attr`` reversibly (runtime patch registry); undone by :meth:`unpatch_all`
        and by ``traceml.shutdown()``.  None when traceml is off or it was patched already."""
        agent = self._current()
        if agent is None or patches.is_active(name):
            return None
        try:
            patches.patch_attribute(owner, attr, replacement, name)
        except Exception:
            self._fail(f"patching {name}")
            return None
        adopt(name, agent)
        self._owned.append(name)
        return name

    def unpatch_all(self) -> None:
        names, self._owned = self._owned, []
        for name in reversed(names):
            patches.undo(name)


def adopt(name: str, agent: Any = None) -> None:
    """Let ``traceml.shutdown()`` undo the registered patch ``name`` along with the agent's own."""
    agent = agent if agent is not None else api._agent
    names = getattr(agent, "_patch_names", None) if agent is not None else None
    if isinstance(names, list) and not getattr(agent, "closed", True):
        names.append(name)
