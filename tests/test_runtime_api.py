"""The public API as a user meets it: ``traceml.*`` and ``traceml.decorators``."""

from __future__ import annotations

import atexit
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import traceml
from traceml.runtime import api, patches

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("TRACEML_") or k in TORCHRUN_VARS:
            monkeypatch.delenv(k)
    yield
    traceml.shutdown()


def test_decorators_facade_is_the_same_api():
    from traceml import decorators

    assert decorators.trace_step is traceml.trace_step is api.trace_step
    assert decorators.trace_time is traceml.trace_time
    assert decorators.init is traceml.init and decorators.shutdown is traceml.shutdown


def test_first_trace_step_starts_the_agent_and_init_returns_it():
    model = torch.nn.Linear(3, 3)
    with traceml.trace_step(model) as step:
        model(torch.randn(2, 3))
    assert step.step == 1  # the index of the next step, once this one is recorded
    agent = api.current_agent()
    assert agent is not None and traceml.init() is agent
    assert agent.tables["step_time"].appended == 1


def test_shutdown_unregisters_atexit_and_restores_the_excepthook():
    import sys

    hook = sys.excepthook
    agent = traceml.init()
    assert agent is not None and sys.excepthook is not hook
    traceml.shutdown()
    assert sys.excepthook is hook
    assert patches.active_patches() == []
    assert atexit.unregister(agent._atexit) is None  # already gone: nothing to do
    traceml.shutdown()  # twice is fine


def test_trace_time_decorator_applied_before_init_records_after_it():
    @traceml.trace_time("setup")
    def setup() -> str:
        return "ready"

    traceml.shutdown()
    agent = traceml.init()
    assert agent is not None
    with traceml.trace_step():
        assert setup() == "ready"
    (row,) = agent.tables["step_region"].recent()
    assert row[0] == 0 and row[2] == "setup" and row[4] == 1


def test_multi_worker_dataloader_is_timed_and_workers_are_left_alone():
    agent = traceml.init()
    assert agent is not None
    model = torch.nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8, num_workers=2)
    for (x,) in loader:
        with traceml.trace_step(model):
            model(x).sum().backward()
    rows = agent.tables["step_time"].recent()
    assert [r[0] for r in rows] == list(range(8))
    assert sum(r[4] for r in rows) > 0  # workers' batches still took time to arrive
    assert all(r[3] == sum(r[4:10]) for r in rows)  # step_us = the six phases


def test_a_forked_child_does_not_time_or_send(tmp_path):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    agent = traceml.init()
    assert agent is not None and agent.sender is None  # no threads to fork over
    marker = tmp_path / "child"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        ok = api._agent is None and api.current_agent() is None and not agent.clock.enabled
        marker.write_text("ok" if ok else "bad")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert marker.read_text() == "ok"
    assert agent.clock.enabled  # the parent goes on


def test_trace_step_entry_returns_the_tracker_only_for_the_agent_and_model_it_was_armed_with():
    """``trace_step``'s common case runs in C (``_fastclock.StepEntry``); whatever the Python
    reference would do differently -- another model, a dead model, a new agent -- goes to it."""
    import gc

    from traceml.runtime.step import FAST

    if FAST is None:
        pytest.skip("the C fast path is not built (or TRACEML_PURE_PYTHON=1)")
    entry = api.trace_step
    a = torch.nn.Linear(3, 3)
    for _ in range(2):
        with traceml.trace_step(a):
            a(torch.randn(2, 3))
    agent = api.current_agent()
    assert agent is not None and entry.armed
    assert traceml.trace_step(a) is traceml.trace_step() is agent.tracker
    b = torch.nn.Linear(3, 3)
    with traceml.trace_step(b):  # another model: the reference attaches it (its forward is timed)
        b(torch.randn(2, 3))
    assert agent._model is b and "forward" in vars(b)
    with traceml.trace_step(a):  # and back: attached again, as the reference does
        a(torch.randn(2, 3))
    assert agent._model is a
    traceml.trace_step(a)
    assert entry.armed
    del a
    gc.collect()
    c = torch.nn.Linear(3, 3)  # may take the dead model's address: the weak reference tells them apart
    traceml.trace_step(c)
    assert agent._model is c
    traceml.shutdown()
    assert not entry.armed
    fresh = traceml.init()
    assert fresh is not None and fresh is not agent
    assert traceml.trace_step(c) is fresh.tracker
    assert traceml.trace_step(c) is fresh.tracker and entry.armed
