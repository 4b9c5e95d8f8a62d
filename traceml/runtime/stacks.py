"""The residual explained: a low-rate stack sampler of the training thread (``step_stack`` rows).

Where the training thread is the main thread, the native timer (``_stacktimer.c``) schedules each
sample as a pending call that the training thread runs itself (a few µs, no GIL hand-off); otherwise
a daemon thread reads the frames (this module).  ``TRACEML_STACK_HZ=0`` turns it off.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from traceml.runtime._failopen import disable_piece
from traceml.runtime.step import NO_PHASE

DEFAULT_HZ = 67.0
MAX_HZ = 1000.0
TOP_PER_PHASE = 5
MAX_NAME = 96
MAX_DEPTH = 64
#: code objects whose attribution is cached (a cache miss costs one path check)
MAX_CACHE = 4096
#: samples the native timer found another thread training before this module samples instead
FOREIGN_LIMIT = 3


def _native_timer() -> Any:
    """The native timer's type, or None: not built, or ``TRACEML_PURE_PYTHON=1``."""
    if os.environ.get("TRACEML_PURE_PYTHON", "").strip() not in ("", "0"):
        return None
    try:
        from traceml.runtime import _stacktimer  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _stacktimer.StackTimer


_INPUT_NAME = re.compile(r"batch|load|read|fetch|collate|getitem|dataset|decode", re.IGNORECASE)
_INPUT_FILES = (
    "numpy/core/memmap.py",
    "numpy/_core/memmap.py",
    "numpy/lib/npyio.py",
    "numpy/lib/_npyio_impl.py",
    "numpy/lib/format.py",
    "/pickle.py",
    "/PIL/",
    "/h5py/",
    "/pyarrow/",
    "/datasets/",
    "/torchvision/datasets/",
    "/torchvision/io/",
    "/torch/utils/data/",
    "/webdataset/",
    "/tokenizers/",
)


def _library_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(os.path.realpath(p))
    roots.add(os.path.realpath(os.path.dirname(os.path.dirname(__file__))))  # traceml itself
    return tuple(sorted(roots))


def _bounded(text: str) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= MAX_NAME else text[: MAX_NAME - 1] + "…"


class StackSampler:
    """Samples the training thread (``clock.owner``) while a step is open (``tracker.depth``)."""

    def __init__(
        self,
        clock: Any,
        tracker: Any,
        append: Callable[[tuple[Any, ...]], None],
        hz: float = DEFAULT_HZ,
        *,
        flush_s: float = 1.0,
        frames: Callable[[], dict[int, FrameType]] = sys._current_frames,
        wall_ns: Callable[[], int] = time.time_ns,
        native: bool = True,
    ) -> None:
        self.clock = clock
        self.tracker = tracker
        self.append = append
        self.period_s = 1.0 / min(max(hz, 0.1), MAX_HZ)
        self.flush_s = flush_s
        self.frames = frames
        self.wall_ns = wall_ns
        self._py_samples = 0
        self.cpu_ns = 0
        #: the native timer while it samples (None: this module's thread samples)
        self._timer: Any = None
        self._timer_lock = threading.Lock()
        self._native = native and frames is sys._current_frames
        self._roots = _library_roots()
        self._user_file: dict[str, bool] = {}
        self._code: dict[int, tuple[CodeType, tuple[str, str, bool, bool]]] = {}
        self._counts: dict[tuple[int, str, str, bool], int] = {}
        self._total = 0
        self._first_step = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        native = _native_timer() if self._native else None
        if native is not None:
            try:
                timer = native(self.clock, self.tracker, self._resolve, 1.0 / self.period_s, MAX_DEPTH)
                timer.start()
                atexit.register(timer.stop)  # before the interpreter goes: no pending call after it
                self._timer = timer
            except Exception:  # a pure-Python clock (no native members), or no thread: sample from ours
                self._timer = None
        self._thread = threading.Thread(target=self._run, name="traceml-stacks", daemon=True)
        self._thread.start()

    @property
    def samples(self) -> int:
        """Samples taken so far (both ways)."""
        timer = self._timer
        return self._py_samples + (timer.samples if timer is not None else 0)

    @property
    def native(self) -> bool:
        """The native timer samples (the training thread is the main thread)."""
        return self._timer is not None

    @property
    def native_ns(self) -> int:
        """Time the native timer's samples took on the training thread."""
        timer = self._timer
        return timer.cost_ns if timer is not None else self._native_ns

    _native_ns = 0

    def _stop_timer(self) -> None:
        with self._timer_lock:  # stop() and the sampler's hand-over may both get here
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.stop()
            self._native_ns = timer.cost_ns
            self._py_samples += timer.samples
            self._merge(*timer.take())
            try:
                atexit.unregister(timer.stop)
            except Exception:
                pass

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        try:
            self._stop_timer()
        except Exception:
            disable_piece("stacks-timer", "the stack sampler")
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout_s)
        try:
            self.flush()
        except Exception:
            disable_piece("stacks-flush", "the stack sampler")

    def _run(self) -> None:
        last_flush = time.monotonic()
        cpu = time.thread_time_ns
        try:
            while not self._stop.wait(self.flush_s if self._timer is not None else self.period_s):
                c0 = cpu()
                timer = self._timer
                if timer is None:
                    self.sample()
                elif timer.foreign >= FOREIGN_LIMIT or not timer.running:
                    self._stop_timer()  # another thread trains (or the timer gave up): sample from here
                now = time.monotonic()
                if now - last_flush >= self.flush_s:
                    last_flush = now
                    self.flush()
                self.cpu_ns += cpu() - c0
        except Exception:
            disable_piece("stacks", "the stack sampler")

    # -- one sample --------------------------------------------------------------------------
    def sample(self) -> None:
        tracker = self.tracker
        if not tracker.depth:
            return
        clock = self.clock
        if not clock.enabled:
            return  # shutting down: the open step is never recorded
        if clock.phase != NO_PHASE:
            return  # a timed phase: its time is measured already, only the residual is sampled
        frame = self.frames().get(clock.owner)
        if frame is None:
            return
        phase = clock.phase
        func, site, is_input = self._attribute(frame)
        key = (phase, func, site, is_input)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        if self._first_step < 0:
            self._first_step = tracker.step
        self._total += 1
        self._py_samples += 1

    def _attribute(self, frame: FrameType | None) -> tuple[str, str, bool]:
        """(function, site, reads data) of the innermost user frame (else the leaf)."""
        leaf: tuple[str, str, bool, bool] | None = None
        user: tuple[str, str, bool, bool] | None = None
        is_input = False
        depth = 0
        while frame is not None and depth < MAX_DEPTH:
            info = self._code_info(frame.f_code)
            if leaf is None:
                leaf = info
            if info[3]:
                is_input = True
            if user is None and info[2]:
                user = info
                if is_input:
                    break
            elif user is not None and is_input:
                break
            frame = frame.f_back
            depth += 1
        chosen = user or leaf
        if chosen is None:
            return "?", "?", False
        return chosen[0], chosen[1], is_input

    def _code_info(self, code: CodeType) -> tuple[str, str, bool, bool]:
        # cached by address (hashing a code object hashes its consts and bytecode: tens of µs on a
        # large module); the entry holds the code object, so its address is not reused meanwhile
        hit = self._code.get(id(code))
        if hit is not None and hit[0] is code:
            return hit[1]
        info = self._resolve(code)
        if len(self._code) < MAX_CACHE:
            self._code[id(code)] = (code, info)
        return info

    def _resolve(self, code: CodeType) -> tuple[str, str, bool, bool]:
        """(function, site, user code, reads data) of one code object."""
        filename = code.co_filename
        user = self._user_file.get(filename)
        if user is None:
            if filename.startswith("<"):
                user = False
            else:
                real = os.path.realpath(filename)
                user = not any(real.startswith(root + os.sep) for root in self._roots)
            self._user_file[filename] = user
        norm = filename.replace(os.sep, "/")
        is_input = bool(_INPUT_NAME.search(code.co_name)) or any(f in norm for f in _INPUT_FILES)
        name = sys.intern(_bounded(getattr(code, "co_qualname", code.co_name)))
        site = sys.intern(_bounded(f"{os.path.basename(filename)}:{code.co_firstlineno}"))
        return (name, site, user, is_input)

    # -- rows ----------------------------------------------------------------------------------
    def _merge(self, counts: dict[tuple[int, str, str, bool], int], total: int, first: int) -> None:
        """Add the native timer's counts to this module's."""
        mine = self._counts
        for key, n in counts.items():
            mine[key] = mine.get(key, 0) + n
        self._total += total
        if first >= 0 and (self._first_step < 0 or first < self._first_step):
            self._first_step = first

    def flush(self) -> None:
        timer = self._timer
        if timer is not None:
            self._merge(*timer.take())
        counts, self._counts = self._counts, {}
        total, self._total = self._total, 0
        first, self._first_step = self._first_step, -1
        if not counts:
            return
        step = max(self.tracker.step - 1, first)
        ts = self.wall_ns()
        by_phase: dict[int, list[tuple[int, str, str, bool]]] = {}
        for (phase, func, site, is_input), n in counts.items():
            by_phase.setdefault(phase, []).append((n, func, site, is_input))
        for phase, items in sorted(by_phase.items()):
            items.sort(key=lambda it: -it[0])
            top = items[:TOP_PER_PHASE]
            rest = sum(it[0] for it in items[TOP_PER_PHASE:])
            for n, func, site, is_input in top:
                self.append((step, ts, first, phase, func, site, n, 1 if is_input else 0, total))
            if rest:
                self.append((step, ts, first, phase, "(other)", "", rest, 0, total))
