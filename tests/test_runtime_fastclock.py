"""The optional C fast path (``traceml/runtime/_fastclock.c``) against the pure-Python reference.

* when the extension is built (``pip install -e .``) it is the one in use, unless
  ``TRACEML_PURE_PYTHON=1``;
* its clock is ``time.perf_counter_ns``'s;
* exceptions of the wrapped calls propagate unchanged and leave no open phase; reference counts
  do not move over thousands of calls; broken traceml state never reaches the training loop;
* the runtime tests pass in both modes (the pure-Python rerun below).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from traceml.runtime import patches, step
from traceml.runtime.hooks import install_torch_hooks, wrap_forward
from traceml.runtime.step import BACKWARD, CARRY, DATALOADER, NO_PHASE, STEP, PhaseClock, StepTracker
from traceml.runtime.steprows import StepRows, raw_array
from traceml.runtime.timed import timed
from traceml.schema import STEP_REGION
from traceml.store import BoundedTable

ROOT = Path(__file__).resolve().parent.parent
BUILT = importlib.util.find_spec("traceml.runtime._fastclock") is not None
PURE = os.environ.get("TRACEML_PURE_PYTHON", "").strip() not in ("", "0")
needs_c = pytest.mark.skipif(step.FAST is None, reason="the C fast path is not built (or TRACEML_PURE_PYTHON=1)")


def test_the_extension_is_used_when_built() -> None:
    if PURE or not BUILT:
        assert step.FAST is None
        assert "__enter__" in vars(StepTracker)  # the Python context
        return
    assert step.FAST is not None
    assert "__enter__" not in vars(StepTracker)  # inherited from the C base
    assert type(timed(PhaseClock(), BACKWARD, lambda: None)).__name__ == "Timed"


@needs_c
def test_its_clock_is_perf_counter_ns() -> None:
    assert step.FAST is not None
    for _ in range(100):
        a = time.perf_counter_ns()
        b = step.FAST.now_ns()
        c = time.perf_counter_ns()
        assert a <= b <= c


def make() -> tuple[PhaseClock, StepTracker, StepRows]:
    clock = PhaseClock()
    rows = StepRows(1 << 14)
    return clock, StepTracker(clock, rows, BoundedTable(STEP_REGION, 64)), rows


class Boom(Exception):
    pass


def test_a_wrapped_call_that_raises_propagates_the_same_exception_and_closes_its_phase() -> None:
    clock, tracker, rows = make()
    err = Boom("x")

    def bad(*args: object, **kwargs: object) -> None:
        raise err

    wrapped = timed(clock, BACKWARD, bad)
    with tracker:
        with pytest.raises(Boom) as got:
            wrapped(1, k=2)
        assert got.value is err
        assert clock.phase == NO_PHASE and clock.gate == CARRY | STEP
        assert clock.acc[BACKWARD] > 0  # the time until it raised still counts, as in Python
    with pytest.raises(Boom), tracker:
        wrapped()
    (ok, failed) = raw_array(rows.take_unsent())
    assert ok[1] == 0 and failed[1] == 1
    assert clock.gate == CARRY and tracker.depth == 0


def test_reference_counts_do_not_move_over_many_steps() -> None:
    clock, tracker, rows = make()
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.randn(64, 4))
    names = install_torch_hooks(clock, h2d=False)
    fw = wrap_forward(clock, model)
    assert fw is not None
    names.append(fw)
    try:
        arg = torch.randn(2, 4)
        result_holder: list[object] = []

        def run(n: int) -> None:
            for _ in range(n):
                for (x,) in DataLoader(data, batch_size=32):
                    with tracker:
                        out = model(x)
                        out.sum().backward()
                        opt.step()
                        opt.zero_grad()
                rows.take_unsent()
            result_holder.append(model(arg))  # outside a step

        run(50)  # warm caches and lazily built state
        gc.collect()
        watched = [clock, tracker, clock.acc, clock.first, clock.carry, arg, model, opt, torch.autograd.backward]
        before = [sys.getrefcount(o) for o in watched]
        ints = sys.getrefcount(0), sys.getrefcount(1), sys.getrefcount(3), sys.getrefcount(-1)
        run(200)
        gc.collect()
        after = [sys.getrefcount(o) for o in watched]
        assert after == before
        # small ints are shared by the whole process: only a leak of thousands would show
        assert all(abs(b - a) < 500 for a, b in zip(ints, (sys.getrefcount(i) for i in (0, 1, 3, -1)), strict=True))
        assert tracker.step == 500
    finally:
        for name in reversed(names):
            patches.undo(name)


@needs_c  # the Python wrapper's ``finally`` would raise the TypeError into the call
def test_broken_traceml_state_never_reaches_the_training_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from traceml.runtime import _failopen

    monkeypatch.setattr(_failopen, "_seen", set())  # "logged once" is per process
    clock, tracker, rows = make()
    calls: list[int] = []
    wrapped = timed(clock, BACKWARD, lambda: calls.append(1) or 7)
    with tracker:
        # the C clock keeps its phase arrays in C memory: they refuse a bad value, unchanged
        before = list(clock.acc)
        with pytest.raises((TypeError, ValueError), match="5 ints"):
            clock.acc = "not a list"  # type: ignore[assignment]
        with pytest.raises((TypeError, ValueError)):
            clock.acc[:] = [1, 2]
        assert list(clock.acc) == before
        tracker.step_table = "not a table"  # type: ignore[assignment]  # the row cannot be appended
        assert wrapped() == 7  # the call runs and returns; nothing raises at the step's end either
    assert calls == [1]
    assert not tracker.enabled  # the step tracker turned itself off (logged once)
    assert any("step timing" in r.getMessage() for r in caplog.records)
    with tracker:
        assert wrapped() == 7


def test_dataloader_fetches_and_epoch_ends_in_both_paths() -> None:
    clock, tracker, rows = make()
    names = install_torch_hooks(clock, h2d=False)
    try:
        loader = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=2)
        for _epoch in range(2):
            it = iter(loader)
            got = []
            while True:
                try:
                    (x,) = next(it)  # StopIteration propagates unchanged, not counted
                except StopIteration:
                    break
                got.append(x.tolist())
                with tracker:
                    pass
            assert got == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
        raw = raw_array(rows.take_unsent())
        assert (raw[:, 4] > 0).all()  # every step carried its fetch
        assert clock.phase == NO_PHASE and clock.gate in (CARRY, CARRY | 4)
    finally:
        for name in reversed(names):
            patches.undo(name)


@pytest.mark.skipif(PURE or step.FAST is None, reason="already the pure-Python run (or nothing to compare)")
def test_the_runtime_tests_pass_in_pure_python_too() -> None:
    env = {**os.environ, "TRACEML_PURE_PYTHON": "1", "PYTHONPATH": str(ROOT)}
    tests = [
        "tests/test_runtime_fastpath.py",
        "tests/test_runtime_fastclock.py",
        "tests/test_runtime_step.py",
        "tests/test_runtime_autostep.py",
        "tests/test_runtime_api.py",
        "tests/test_runtime_gpu.py",
        "tests/test_runtime_stacks.py",
        "tests/test_runtime_hostmem.py",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


class _Gpu:
    """A stand-in GPU timer: the rare path on every step."""

    def __init__(self) -> None:
        self.calls = 0

    def begin(self, phase: int) -> None:
        self.calls += 1

    def end(self, phase: int) -> None:
        self.calls += 1

    def cancel(self, phase: int) -> None:
        self.calls += 1

    def step_begin(self) -> None:
        self.calls += 1

    def step_end(self, step: int, ts_ns: int) -> None:
        self.calls += 1


class _It:
    def __init__(self, dataset: object) -> None:
        self._dataset = dataset


def _drive(seed: int, fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """One random schedule of steps, phases, fetches, failures and switches; what it recorded."""
    import random

    from traceml.runtime import hooks

    rng = random.Random(seed)
    with monkeypatch.context() as mp:
        if not fast:  # build the Python wrappers even where the C path is in use
            mp.setattr(step, "FAST", None)
            mp.setattr(hooks, "FAST", None)

        class PyTracker(StepTracker):
            __slots__ = ()
            __enter__ = step.PY_ENTER  # type: ignore[assignment]
            __exit__ = step.PY_EXIT  # type: ignore[assignment]

        clock = PhaseClock()
        rows = StepRows(1 << 14)
        tracker = (StepTracker if fast else PyTracker)(clock, rows, BoundedTable(STEP_REGION, 1 << 12))
        mem = []

        class Mem:
            every = 3
            begins = False

            def step_begin(self) -> None:  # pragma: no cover
                pass

            def step_end(self, s: int, ts: int) -> None:
                mem.append(s)

        tracker.memory = Mem()

        def work(x: int = 0) -> int:
            if x < 0:
                raise Boom(x)
            return x + 1

        back = timed(clock, BACKWARD, work)
        fwd = timed(clock, step.FORWARD, work)
        datasets = [object(), object()]
        fetch = hooks._fetch_wrapper(clock, lambda it: it._dataset)
        opt_pre, opt_post = hooks.optimizer_hooks(clock)
        gpu = _Gpu()
        log: list[tuple] = []
        for _ in range(300):
            op = rng.random()
            if op < 0.1:
                tracker.gpu = gpu if tracker.gpu is None else None
                clock.gpu = tracker.gpu
            elif op < 0.13:
                tracker.enabled = not tracker.enabled
            elif op < 0.3:
                try:
                    log.append(("fetch", datasets.index(fetch(_It(datasets[rng.random() < 0.2])))))
                except Exception as exc:  # pragma: no cover - must not happen
                    log.append(("fetch-error", repr(exc)))
            else:
                fail = rng.random() < 0.1
                try:
                    with tracker:
                        for _ in range(rng.randrange(4)):
                            k = rng.random()
                            x = -1 if rng.random() < 0.1 else 1
                            try:
                                log.append(("call", (back if k < 0.5 else fwd)(x)))
                            except Boom:
                                log.append(("raised",))
                            if k > 0.8:
                                opt_pre(None, (), {})
                                opt_post(None, (), {})
                        if rng.random() < 0.1:
                            tracker.add_region("r", 5, 0)
                        if fail:
                            raise Boom("step")
                except Boom:
                    log.append(("step-failed",))
        got = raw_array(rows.take_unsent())
        log.append(("steps", got[:, 0].tolist(), got[:, 1].tolist(), (got[:, 4:9] > 0).tolist()))
        log.append(("starts", (got[:, 9:14] > 0).tolist(), "gpu calls", gpu.calls))
        log.append(("regions", [r[0] for r in tracker.region_table.take_unsent()]))
        log.append(("mem", mem, "cost steps", tracker.cost_steps, "failed", tracker.steps_failed))
        log.append(("end", tracker.step, tracker.depth, clock.gate, clock.base, clock.phase, tracker.enabled))
        return log


@needs_c
@pytest.mark.parametrize("seed", range(12))
def test_c_and_python_record_the_same_steps_on_random_schedules(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _drive(seed, True, monkeypatch) == _drive(seed, False, monkeypatch)


@needs_c
def test_sampled_steps_stay_in_c_and_measure_their_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from traceml.runtime.hooks import optimizer_hooks
    from traceml.runtime.step import FORWARD, sampled_step

    assert step.FAST is not None and step.FAST.SAMPLING == (
        step.SAMPLE_EVERY,
        step.SAMPLE_WARM,
        step.SAMPLE_EVERY_LATER,
        step.SAMPLE_OFFSET,
    )
    from traceml.runtime.steprows import YIELD_EVERY, YIELD_S

    assert (YIELD_EVERY, round(YIELD_S * 1e9)) == step.FAST.YIELD  # else step.py would not use it
    clock, tracker, rows = make()
    python_path: list[int] = []
    enter_full, exit_full = StepTracker._enter_full, StepTracker._exit_full
    monkeypatch.setattr(StepTracker, "_enter_full", lambda self: python_path.append(self.step) or enter_full(self))
    monkeypatch.setattr(
        StepTracker, "_exit_full", lambda self, *a: python_path.append(self.step) or exit_full(self, *a)
    )
    fwd = timed(clock, FORWARD, lambda: time.sleep(0))
    pre, post = optimizer_hooks(clock)

    class Batches:  # a DataLoader iterator: its loader is named by its dataset
        _dataset = object()

    it, full_fetches = Batches(), []

    def full_fetch(*args: object) -> int:  # the Python reference of the fetch: must not run here
        full_fetches.append(tracker.step)
        return 0

    fetch = step.FAST.Fetch(clock, DATALOADER, lambda _it: 1, full_fetch)
    n = 200
    taken: list[bytes] = []
    clock.train_src = id(Batches._dataset)  # the training loader, as step 0's full path would adopt it
    for i in range(n):
        if i:
            assert fetch(it) == 1  # between steps, also before a sampled step: the C path
        with tracker:
            fwd()
            pre(None, (), {})
            post(None, (), {})
        taken += rows.take_unsent()
    assert full_fetches == []
    assert (raw_array(taken)[1:, 4 + DATALOADER] > 0).all()  # each fetch carried into its step
    assert python_path == [0]  # only step 0's exit (it plans the next slow step); no sampled step
    assert tracker.cost_steps == len([s for s in range(n) if sampled_step(s)]) == 4  # 1, 65, 129, 193
    assert 0 < tracker.cost_ns < tracker.cost_steps * 1_000_000  # its own time: µs, not the step's
    assert clock.self_ns == 0  # handed to the step's cost at its exit
