"""Communication time: DDP's gradient all-reduce, timed bucket by bucket through a comm hook.

:func:`attach_ddp` registers a DDP communication hook that runs torch's default all-reduce and
times each bucket from its launch to the completion of its future (a callback on the future: no
synchronize, nothing waits for it).  Per step one ``step_comm`` row: ``comm_us`` (the union of the
buckets' intervals), ``exposed_us`` (the last bucket's launch to the last completion: when the
last gradients are ready no compute is left to hide the all-reduce behind, so this is what the
step waits for) and ``buckets``.  A row is written when the next step's first bucket launches
(by then DDP has waited for every future of the step) and at :meth:`CommTimer.flush`.

DDP accepts one comm hook per model: a model that has one (the user's own) is left alone.  On
CUDA the same future callback fires when the NCCL work completes on the communication stream.

:func:`install_collectives` also times the blocking ``torch.distributed`` collectives a script
calls itself (``dist.all_reduce(...)`` to average gradients by hand, a loss all-reduced for
logging): launch to return on the training thread, all of it exposed, counted in the same row
(``buckets`` counts them too).  ``async_op=True`` calls are passed through untimed (their wait is
wherever the script waits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from traceml.runtime._failopen import disable_piece, log_once

_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns

#: buckets kept per step (a model with more is timed on its first ones)
MAX_BUCKETS = 4096


class CommTimer:
    """Collects (launch, done) per bucket of the current step; one row per step."""

    def __init__(self, current_step: Callable[[], int], append: Callable[[tuple[Any, ...]], None]) -> None:
        self.current_step = current_step
        self.append = append
        self.enabled = True
        self.rows = 0
        self._lock = threading.Lock()
        self._step = -1
        self._spans: list[list[int]] = []
        self._sync_ns = 0
        self._sync_calls = 0

    def launched(self) -> list[int]:
        """A bucket's all-reduce starts now; returns its [launch, done] cell (done filled later)."""
        step = self.current_step()
        cell = [_perf_ns(), 0]
        with self._lock:
            if step != self._step:
                self._emit_locked()
                self._step = step
            if len(self._spans) < MAX_BUCKETS:
                self._spans.append(cell)
        return cell

    def synchronous(self, ns: int) -> None:
        """A blocking collective called in the step took ``ns``: all of it is exposed."""
        step = self.current_step()
        with self._lock:
            if step != self._step:
                self._emit_locked()
                self._step = step
            self._sync_ns += ns
            self._sync_calls += 1

    def flush(self) -> None:
        with self._lock:
            self._emit_locked()

    def _emit_locked(self) -> None:
        spans, self._spans = self._spans, []
        sync_ns, calls = self._sync_ns, self._sync_calls
        self._sync_ns = self._sync_calls = 0
        step = self._step
        done = sorted(s for s in spans if s[1])
        if step < 0 or not (done or calls):
            return
        union = exposed = 0
        if done:
            cur0, cur1 = done[0]
            for t0, t1 in done[1:]:
                if t0 > cur1:
                    union += cur1 - cur0
                    cur0, cur1 = t0, t1
                else:
                    cur1 = max(cur1, t1)
            union += cur1 - cur0
            exposed = max(0, max(s[1] for s in done) - max(s[0] for s in done))
        # blocking collectives run on the training thread: nothing overlaps them
        union += sync_ns
        exposed += sync_ns
        self.append((step, _wall_ns(), union // 1000, exposed // 1000, len(done) + calls))
        self.rows += 1


def attach_ddp(model: Any, timer: CommTimer) -> bool:
    """Register the timing all-reduce hook on a DDP model; False when not possible (logged)."""
    try:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    except Exception:
        return False
    if getattr(model, "_traceml_comm", False):
        return False
    if getattr(getattr(model, "logger", None), "_get_ddp_logging_data", None) is not None:
        try:
            data = model.logger._get_ddp_logging_data()
            if data.get("comm_hook"):
                log_once("comm-own-hook", "traceml: the DDP model has its own comm hook; all-reduce time not measured")
                return False
        except Exception:
            pass

    def traceml_allreduce(state: Any, bucket: Any) -> Any:
        if not timer.enabled:
            return default_hooks.allreduce_hook(state, bucket)
        try:
            cell = timer.launched()
        except Exception:
            timer.enabled = False
            disable_piece("comm-timer", "the all-reduce timer")
            return default_hooks.allreduce_hook(state, bucket)
        fut = default_hooks.allreduce_hook(state, bucket)

        def done(f: Any) -> Any:
            cell[1] = _perf_ns()
            return f.value()

        return fut.then(done)

    # DDP checks the hook's annotations against its own types; ours are strings (postponed): drop them
    traceml_allreduce.__annotations__ = {}
    try:
        model.register_comm_hook(dist.group.WORLD if dist.is_initialized() else None, traceml_allreduce)
        model._traceml_comm = True
        return True
    except Exception:
        log_once(
            "comm-hook", "traceml: could not register the DDP comm hook; all-reduce time not measured", exc_info=True
        )
        return False


#: the blocking collectives timed when called through ``torch.distributed``
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "barrier",
)


def install_collectives(
    timer_for: Callable[[], CommTimer | None], owner: Callable[[], int], tag: str = ""
) -> list[str]:
    """Patch ``torch.distributed.<collective>`` to time blocking calls on the training thread
    (``owner()``) into ``timer_for()``; returns the registry names (undone by shutdown)."""
    import torch.distributed as dist

    from traceml.runtime import patches

    names: list[str] = []
    get_ident = threading.get_ident
    for fname in COLLECTIVES:
        fn = getattr(dist, fname, None)
        if fn is None:
            continue

        def make(fn: Callable[..., Any]) -> Callable[..., Any]:
            def traceml_collective(*args: Any, **kwargs: Any) -> Any:
                if kwargs.get("async_op") or get_ident() != owner():
                    return fn(*args, **kwargs)
                timer = timer_for()
                if timer is None or not timer.enabled:
                    return fn(*args, **kwargs)
                t0 = _perf_ns()
                try:
                    return fn(*args, **kwargs)
                finally:
                    try:
                        timer.synchronous(_perf_ns() - t0)
                    except Exception:
                        timer.enabled = False
                        disable_piece("comm-collective", "timing torch.distributed collectives")

            traceml_collective.__wrapped__ = fn  # type: ignore[attr-defined]
            traceml_collective.__name__ = fn.__name__
            traceml_collective.__doc__ = fn.__doc__
            return traceml_collective

        suffix = f" [{tag}]" if tag else ""
        try:
            names.append(patches.patch_attribute(dist, fname, make(fn), f"torch.distributed.{fname}{suffix}"))
        except Exception:
            disable_piece("comm-collective-patch", "timing torch.distributed collectives")
    return names
