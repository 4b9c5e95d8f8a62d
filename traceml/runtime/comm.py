"""Communication time (DDP all-reduce, FSDP all-gather/reduce-scatter, ``torch.distributed`` collectives):
one ``step_comm`` row per step (``comm_us``, ``exposed_us``, ``buckets``), never a synchronize.

How each kind is timed and what counts as exposed: docs/internals.md, "Rank runtime".
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from traceml.runtime._failopen import disable_piece, log_once

_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns

#: collectives kept per step (a step with more is timed on its first ones)
MAX_BUCKETS = 4096
#: rows of past steps held while their CUDA events are still running (then dropped, counted)
MAX_LATE_ROWS = 64

#: set while traceml's own DDP hook runs torch's all-reduce (its bucket is timed already)
_quiet = threading.local()


class CommTimer:
    """Collects the current step's collectives; one row per step."""

    def __init__(self, current_step: Callable[[], int], append: Callable[[tuple[Any, ...]], None]) -> None:
        self.current_step = current_step
        self.append = append
        self.enabled = True
        self.rows = 0
        #: GPU-timed rows dropped because their events had not completed in time
        self.late_dropped = 0
        self._lock = threading.Lock()
        self._step = -1
        self._spans: list[list[int]] = []  # DDP buckets: [launch, done]
        self._sync: list[tuple[int, int]] = []  # blocking calls: (start, end)
        self._async: list[list[int]] = []  # [issue, done, wait called, wait returned]
        self._gpu: list[tuple[Any, Any, bool]] = []  # (start event, end event, on the compute stream)
        self._waits: dict[int, tuple[Any, list[int]]] = {}  # id(work) -> (weakref, its cell)
        self._late: list[tuple[int, int, int, int, list[tuple[Any, Any, bool]]]] = []

    # -- recording (any thread) --------------------------------------------------------
    def _roll_locked(self, step: int) -> bool:
        if step != self._step:
            self._emit_locked()
            self._step = step
        return len(self._spans) + len(self._sync) + len(self._async) + len(self._gpu) < MAX_BUCKETS

    def launched(self) -> list[int]:
        """A DDP bucket's all-reduce starts now; returns its [launch, done] cell (done filled later)."""
        step = self.current_step()
        cell = [_perf_ns(), 0]
        with self._lock:
            if self._roll_locked(step):
                self._spans.append(cell)
        return cell

    def synchronous(self, t0: int, t1: int) -> None:
        """A blocking collective ran on the training thread from ``t0`` to ``t1`` (all exposed)."""
        step = self.current_step()
        with self._lock:
            if self._roll_locked(step):
                self._sync.append((t0, t1))

    def issued(self, work: Any, t0: int) -> None:
        """An ``async_op=True`` collective was issued at ``t0`` and returned ``work``."""
        step = self.current_step()
        cell = [t0, 0, 0, 0]
        with self._lock:
            if not self._roll_locked(step):
                return
            self._async.append(cell)
            self._waits[id(work)] = (weakref.ref(work), cell)
        try:
            fut = work.get_future()
        except Exception:
            return  # a backend without futures: the wait's return stands for the completion

        def done(_f: Any) -> None:
            if not cell[1]:
                cell[1] = _perf_ns()

        fut.add_done_callback(done)

    def waiting(self, work: Any) -> list[int] | None:
        """The cell of an async collective of this step, when ``work.wait()`` is called on it."""
        entry = self._waits.pop(id(work), None)
        if entry is None or entry[0]() is not work:
            return None
        return entry[1]

    def gpu(self, start: Any, end: Any, compute_stream: bool) -> None:
        """A collective on CUDA tensors between two recorded events of its stream."""
        step = self.current_step()
        with self._lock:
            if self._roll_locked(step):
                self._gpu.append((start, end, compute_stream))

    def flush(self) -> None:
        with self._lock:
            self._emit_locked()
            self._resolve_late_locked(final=True)

    # -- rows --------------------------------------------------------------------------
    def _emit_locked(self) -> None:
        spans, self._spans = self._spans, []
        sync, self._sync = self._sync, []
        cells, self._async = self._async, []
        gpu, self._gpu = self._gpu, []
        self._waits.clear()
        step = self._step
        if self._late:
            self._resolve_late_locked(final=False)
        if step < 0:
            return
        intervals: list[tuple[int, int]] = []
        exposed = 0
        done = [(s[0], s[1]) for s in spans if s[1]]
        if done:
            exposed += max(0, max(t1 for _, t1 in done) - max(t0 for t0, _ in done))
            intervals += done
        for t0, t1 in sync:
            intervals.append((t0, t1))
            exposed += t1 - t0
        for t0, t1, w0, w1 in cells:
            end = t1 or w1  # the future's completion, else the wait's return
            if not end:
                continue  # neither completed nor waited for in its step
            intervals.append((t0, end))
            if w0:
                exposed += max(0, end - w0)
        count = len(intervals) + len(gpu)
        if not count:
            return
        union = 0
        if intervals:
            intervals.sort()
            cur0, cur1 = intervals[0]
            for t0, t1 in intervals[1:]:
                if t0 > cur1:
                    union += cur1 - cur0
                    cur0, cur1 = t0, t1
                else:
                    cur1 = max(cur1, t1)
            union += cur1 - cur0
        if gpu:
            self._late.append((step, union, exposed, count, gpu))
            self._resolve_late_locked(final=False)
        else:
            self._write(step, union, exposed, count)

    def _resolve_late_locked(self, final: bool) -> None:
        """Write the rows whose CUDA events have completed, oldest first (never waits)."""
        while self._late:
            step, union, exposed, count, gpu = self._late[0]
            if not all(end.query() for _, end, _ in gpu):
                if final or len(self._late) > MAX_LATE_ROWS:
                    self._late.pop(0)
                    self.late_dropped += 1
                    continue
                return
            self._late.pop(0)
            side_last = 0
            for start, end, on_compute in gpu:
                ns = int(start.elapsed_time(end) * 1e6)
                union += ns
                if on_compute:
                    exposed += ns
                else:
                    side_last = ns
            self._write(step, union, exposed + side_last, count)

    def _write(self, step: int, union: int, exposed: int, count: int) -> None:
        self.append((step, _wall_ns(), union // 1000, exposed // 1000, count))
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
        _quiet.on = True  # torch's hook calls dist.all_reduce(async_op=True): this bucket is timed already
        try:
            fut = default_hooks.allreduce_hook(state, bucket)
        finally:
            _quiet.on = False

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


#: the collectives timed when called through ``torch.distributed`` (FSDP2 calls the ``_single`` ones)
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "barrier",
)


def _on_cuda(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a collective's first tensor argument (or first of its list) is a CUDA tensor."""
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(x, (list, tuple)):
        x = x[0] if x else None
    return bool(getattr(x, "is_cuda", False))


def _gpu_events() -> tuple[Any, bool]:
    """A started CUDA event on the current stream, and whether that stream is the compute stream."""
    cuda = sys.modules["torch"].cuda
    start = cuda.Event(enable_timing=True)
    start.record()
    return start, cuda.current_stream() == cuda.default_stream()


def _gpu_end() -> Any:
    end = sys.modules["torch"].cuda.Event(enable_timing=True)
    end.record()
    return end


def install_collectives(
    timer_for: Callable[[], CommTimer | None], owner: Callable[[], int], tag: str = ""
) -> list[str]:
    """Patch ``torch.distributed.<collective>`` (and ``Work.wait``) to time the collectives a
    step calls into ``timer_for()`` (None outside a step); returns the registry names (undone by
    shutdown).  Blocking CPU calls are timed on the training thread (``owner()``) only."""
    import torch.distributed as dist

    from traceml.runtime import patches

    names: list[str] = []
    get_ident = threading.get_ident
    suffix = f" [{tag}]" if tag else ""

    def broken(exc_key: str, timer: CommTimer) -> None:
        timer.enabled = False
        disable_piece(exc_key, "timing torch.distributed collectives")

    for fname in COLLECTIVES:
        fn = getattr(dist, fname, None)
        if fn is None:
            continue
        try:
            async_index = list(inspect.signature(fn).parameters).index("async_op")
        except (TypeError, ValueError):
            async_index = 1 << 30

        def make(fn: Callable[..., Any], async_index: int) -> Callable[..., Any]:
            def traceml_collective(*args: Any, **kwargs: Any) -> Any:
                if getattr(_quiet, "on", False):
                    return fn(*args, **kwargs)
                timer = timer_for()
                if timer is None or not timer.enabled:
                    return fn(*args, **kwargs)
                asynchronous = (
                    kwargs["async_op"] if "async_op" in kwargs else len(args) > async_index and args[async_index]
                )
                if asynchronous:
                    t0 = _perf_ns()
                    work = fn(*args, **kwargs)
                    if work is not None:
                        try:
                            timer.issued(work, t0)
                        except Exception:
                            broken("comm-async", timer)
                    return work
                try:
                    cuda = _on_cuda(args, kwargs)
                    started = _gpu_events() if cuda else None
                except Exception:
                    broken("comm-gpu", timer)
                    return fn(*args, **kwargs)
                if started is not None:
                    result = fn(*args, **kwargs)
                    try:
                        timer.gpu(started[0], _gpu_end(), started[1])
                    except Exception:
                        broken("comm-gpu", timer)
                    return result
                if get_ident() != owner():
                    return fn(*args, **kwargs)
                t0 = _perf_ns()
                try:
                    return fn(*args, **kwargs)
                finally:
                    try:
                        timer.synchronous(t0, _perf_ns())
                    except Exception:
                        broken("comm-collective", timer)

            traceml_collective.__wrapped__ = fn  # type: ignore[attr-defined]
            traceml_collective.__name__ = fn.__name__
            traceml_collective.__doc__ = fn.__doc__
            return traceml_collective

        try:
            names.append(
                patches.patch_attribute(dist, fname, make(fn, async_index), f"torch.distributed.{fname}{suffix}")
            )
        except Exception:
            disable_piece("comm-collective-patch", "timing torch.distributed collectives")

    work_type = getattr(dist, "Work", None)
    wait = getattr(work_type, "wait", None)
    if wait is not None:

        def traceml_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
            timer = timer_for()
            cell = timer.waiting(self) if timer is not None and timer._waits else None
            if cell is None:
                return wait(self, *args, **kwargs)
            cell[2] = _perf_ns()
            try:
                return wait(self, *args, **kwargs)
            finally:
                cell[3] = _perf_ns()

        traceml_wait.__wrapped__ = wait  # type: ignore[attr-defined]
        try:
            names.append(
                patches.patch_attribute(work_type, "wait", traceml_wait, f"torch.distributed.Work.wait{suffix}")
            )
        except Exception:
            disable_piece("comm-wait-patch", "timing the wait of async collectives")
    return names
