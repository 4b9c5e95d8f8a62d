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

    def flush(self) -> None:
        with self._lock:
            self._emit_locked()

    def _emit_locked(self) -> None:
        spans, self._spans = self._spans, []
        step = self._step
        if not spans or step < 0:
            return
        done = [s for s in spans if s[1]]
        if not done:
            return
        done.sort()
        union = 0
        cur0, cur1 = done[0]
        for t0, t1 in done[1:]:
            if t0 > cur1:
                union += cur1 - cur0
                cur0, cur1 = t0, t1
            else:
                cur1 = max(cur1, t1)
        union += cur1 - cur0
        last_launch = max(s[0] for s in done)
        last_done = max(s[1] for s in done)
        self.append((step, _wall_ns(), union // 1000, max(0, last_done - last_launch) // 1000, len(done)))
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
