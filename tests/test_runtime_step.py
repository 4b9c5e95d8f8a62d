"""The hot path with real torch on CPU: phases, attribution, failures, regions, wrappers.

Phase durations are checked with lower bounds from ``time.sleep`` inside the phase (sleep
guarantees at least that long) and with exact zeros for phases that did not happen; never
with upper bounds on time.
"""

from __future__ import annotations

import copy
import os
import pickle
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from traceml.config import RankConfig
from traceml.runtime import patches
from traceml.runtime.agent import Agent
from traceml.runtime.hooks import TimedForward, wrapper_kind
from traceml.schema import PHASES, STEP_TIME, STEP_TIMELINE
from traceml.transport import RankIdentity

COLS = STEP_TIME.names
SLEEP_S = 0.003
SLEEP_US = int(SLEEP_S * 1e6)


def rows(agent: Agent, table: str = "step_time") -> list[dict]:
    t = agent.tables[table]
    return [dict(zip(t.schema.names, r, strict=True)) for r in t.recent()]


def check_sums(row: dict) -> None:
    named = sum(row[f"{p}_us"] for p in PHASES)
    assert row["residual_us"] >= 0
    assert named == row["step_us"], row


class SlowForward(torch.nn.Module):
    def __init__(self, sleep_s: float = SLEEP_S) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.sleep_s = sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.sleep_s)
        return self.lin(x)


class _SlowGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        time.sleep(SLEEP_S)
        return g


class SlowSGD(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[override]
        time.sleep(SLEEP_S)
        return super().step(closure)


class SlowDataset(Dataset):
    def __init__(self, n: int = 8) -> None:
        self.x = torch.randn(n, 8)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(SLEEP_S)
        return self.x[i]


@pytest.fixture
def agent():
    a = Agent(RankConfig(), start=False, identity=RankIdentity(host="test", pid=os.getpid()))
    yield a
    a.close()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = _SlowGrad.apply(model(x)).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_every_phase_is_attributed_and_phases_sum_to_the_step(agent):
    model = SlowForward()
    opt = SlowSGD(model.parameters(), lr=0.1)
    loader = DataLoader(SlowDataset(8), batch_size=2)
    for x in loader:  # batch fetched BEFORE entering the step: carried into it
        with agent.step_context(model):
            train_step(model, opt, x)
    got = rows(agent)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    for r in got:
        check_sums(r)
        assert r["failed"] == 0
        assert r["dataloader_us"] >= 2 * SLEEP_US  # two samples per batch, each sleeps
        assert r["forward_us"] >= SLEEP_US
        assert r["backward_us"] >= SLEEP_US
        assert r["optimizer_us"] >= SLEEP_US
        assert r["h2d_us"] == 0  # CPU build: no copy to a device
        assert r["step_us"] >= 5 * SLEEP_US
        assert r["ts_ns"] > 0


def test_dataloader_inside_the_step_and_no_dataloader_at_all(agent):
    model = SlowForward(sleep_s=0)
    it = iter(DataLoader(SlowDataset(4), batch_size=1))
    with agent.step_context(model):
        model(next(it))
    with agent.step_context(model):  # a plain tensor: no DataLoader involved
        model(torch.randn(1, 8))
    first, second = rows(agent)
    assert first["dataloader_us"] >= SLEEP_US
    assert second["dataloader_us"] == 0
    assert second["backward_us"] == 0 and second["optimizer_us"] == 0
    for r in (first, second):
        check_sums(r)


def test_gradient_accumulation_sums_the_micro_batches(agent):
    model = SlowForward()
    opt = SlowSGD(model.parameters(), lr=0.1)
    with agent.step_context(model):
        for _ in range(3):
            _SlowGrad.apply(model(torch.randn(2, 8))).sum().backward()
        opt.step()
        opt.zero_grad()
    (r,) = rows(agent)
    assert r["forward_us"] >= 3 * SLEEP_US
    assert r["backward_us"] >= 3 * SLEEP_US
    assert r["optimizer_us"] >= SLEEP_US
    check_sums(r)


def test_failed_step_is_recorded_and_the_same_exception_propagates(agent):
    model = SlowForward(sleep_s=0)
    boom = ValueError("user bug")
    with pytest.raises(ValueError) as info, agent.step_context(model):
        model(torch.randn(1, 8))
        raise boom
    assert info.value is boom
    assert info.value.__traceback__ is not None
    assert "test_runtime_step" in info.value.__traceback__.tb_frame.f_code.co_filename
    with agent.step_context(model):
        model(torch.randn(1, 8))
    failed, ok = rows(agent)
    assert (failed["step"], failed["failed"]) == (0, 1)
    assert (ok["step"], ok["failed"]) == (1, 0)
    assert agent.tracker.steps_failed == 1
    check_sums(failed)


def test_optimizer_that_raises_leaves_no_open_phase(agent):
    model = SlowForward(sleep_s=0)

    class Broken(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            time.sleep(SLEEP_S)
            raise RuntimeError("nan in step")

    opt = Broken(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError), agent.step_context(model):
        opt.step()
    with agent.step_context(model):
        model(torch.randn(1, 8))
    first, second = rows(agent)
    assert first["failed"] == 1 and first["optimizer_us"] >= SLEEP_US
    assert second["optimizer_us"] == 0 and second["forward_us"] > 0
    check_sums(first)


def test_nested_phases_are_timed_once_and_outer_wins(agent):
    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = SlowForward()

        def forward(self, x):
            y = self.inner(x)
            # backward inside forward (e.g. a gradient penalty) belongs to forward
            z = x.detach().requires_grad_()
            (z * 2).sum().backward()
            return y

    model = Outer()
    with agent.step_context(model):
        model(torch.randn(1, 8))
    (r,) = rows(agent)
    assert r["forward_us"] >= SLEEP_US
    assert r["backward_us"] == 0
    check_sums(r)


def test_nested_trace_step_counts_as_one_step(agent):
    model = SlowForward(sleep_s=0)
    with agent.step_context(model), agent.step_context(model):
        model(torch.randn(1, 8))
    assert [r["step"] for r in rows(agent)] == [0]


def test_other_threads_do_not_count_as_the_training_loop(agent):
    loader = DataLoader(SlowDataset(4), batch_size=1)
    got: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: got.extend(loader), name="prefetch")
    with agent.step_context(None):
        t.start()
        t.join()
    (r,) = rows(agent)
    assert len(got) == 4
    assert r["dataloader_us"] == 0
    assert r["step_us"] >= 4 * SLEEP_US  # the step waited, as residual
    check_sums(r)


def test_phases_outside_a_step_are_not_recorded_but_waits_are_carried(agent):
    model = SlowForward()
    model(torch.randn(1, 8))  # an eval forward between steps
    it = iter(DataLoader(SlowDataset(2), batch_size=1))
    next(it)
    with agent.step_context(model):
        pass
    (r,) = rows(agent)
    assert r["forward_us"] == 0
    assert r["dataloader_us"] >= SLEEP_US
    assert r["step_us"] >= r["dataloader_us"]
    check_sums(r)


def test_trace_time_regions_per_step_and_outside(agent):
    from traceml.runtime.regions import Region

    def region(name):
        return Region(name, lambda: agent.tracker)

    @region("decorated")
    def work(n):
        time.sleep(SLEEP_S)
        return n * 2

    with agent.step_context(None):
        with region("ctx"):
            time.sleep(SLEEP_S)
        assert work(2) == 4
        assert work(3) == 6
    with region("after"):
        pass
    got = {(r["step"], r["name"]): r for r in rows(agent, "step_region")}
    assert set(got) == {(0, "ctx"), (0, "decorated"), (-1, "after")}
    assert got[(0, "decorated")]["calls"] == 2
    assert got[(0, "decorated")]["cpu_us"] >= 2 * SLEEP_US
    assert got[(0, "ctx")]["calls"] == 1 and got[(0, "ctx")]["cpu_us"] >= SLEEP_US
    assert work.__name__ == "work"


def test_region_reused_and_nested_with_one_object(agent):
    from traceml.runtime.regions import Region

    r = Region("same", lambda: agent.tracker)
    with agent.step_context(None), r, r:
        pass
    (row,) = rows(agent, "step_region")
    assert row["calls"] == 2


def test_h2d_counts_only_host_to_device_copies(monkeypatch):
    # a CPU build has no CUDA device: force the patch and use the "meta" device as the target
    a = Agent(RankConfig(), start=False, h2d=True, identity=RankIdentity(host="t", pid=os.getpid()))
    try:
        assert "Tensor.to" in patches.active_patches()
        x = torch.randn(64, 64)
        with a.step_context(None):
            y = x.to("meta")
            x.to(torch.float64)  # a cast is not a copy to a device
            x.to("cpu")
        (r,) = rows(a)
        assert y.device.type == "meta"
        assert r["h2d_us"] > 0
        with a.step_context(None):
            x.to(torch.float64)
        assert rows(a)[1]["h2d_us"] == 0
    finally:
        a.close()
    assert "Tensor.to" not in patches.active_patches()


def test_forward_wrapper_is_per_instance_and_removed(agent):
    a_model, b_model = SlowForward(0), SlowForward(0)
    with agent.step_context(a_model):
        b_model(torch.randn(1, 8))  # an untraced instance of the same class
    (r,) = rows(agent)
    assert r["forward_us"] == 0
    assert isinstance(vars(a_model)["forward"], TimedForward)
    assert "forward" not in vars(b_model)
    agent.close()
    assert "forward" not in vars(a_model)
    assert a_model(torch.randn(1, 8)).shape == (1, 4)


def test_traced_model_still_pickles_and_deepcopies(agent):
    model = SlowForward(0)
    with agent.step_context(model):
        model(torch.randn(1, 8))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not isinstance(vars(clone).get("forward"), TimedForward)
        assert clone(torch.randn(1, 8)).shape == (1, 4)


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_torch_compile_model_is_timed(agent):
    model = SlowForward()
    compiled = torch.compile(model, backend="eager")
    assert wrapper_kind(compiled) == "none"
    for _ in range(2):
        with agent.step_context(compiled):
            compiled(torch.randn(2, 8))
    for r in rows(agent):
        assert r["forward_us"] >= SLEEP_US
        check_sums(r)
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_module_compile_in_place_is_timed(agent):
    model = SlowForward()
    model.compile(backend="eager")
    with agent.step_context(model):
        model(torch.randn(2, 8))
    (r,) = rows(agent)
    assert r["forward_us"] >= SLEEP_US
    assert isinstance(vars(model)["_compiled_call_impl"], TimedForward)
    torch._dynamo.reset()


def test_wrapper_kind_reads_the_class_names():
    class DistributedDataParallel(torch.nn.Module):
        pass

    class FullyShardedDataParallel(torch.nn.Module):
        pass

    assert wrapper_kind(DistributedDataParallel()) == "DDP"
    assert wrapper_kind(FullyShardedDataParallel()) == "FSDP"
    assert wrapper_kind(torch.nn.Linear(1, 1)) == "none"
    assert wrapper_kind(torch.compile(DistributedDataParallel(), backend="eager")) == "DDP"


def test_telemetry_failure_is_swallowed_and_disables_only_that_piece(agent, caplog):
    model = SlowForward(0)

    class Exploding:
        schema = STEP_TIME

        def append(self, row):
            raise MemoryError("table broke")

    agent.tracker.step_table = Exploding()  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="traceml.runtime"), agent.step_context(model):
        out = model(torch.randn(1, 8))
    assert out.shape == (1, 4)
    assert agent.tracker.enabled is False
    assert any("step timing" in r.getMessage() for r in caplog.records)
    with agent.step_context(model):  # later steps: a no-op, still no exception
        model(torch.randn(1, 8))


def test_close_removes_every_patch_and_a_new_agent_patches_again():
    ident = RankIdentity(host="t", pid=os.getpid())
    a = Agent(RankConfig(), start=False, identity=ident)
    m = SlowForward(0)
    with a.step_context(m):
        m(torch.randn(1, 8))
    names = patches.active_patches()
    for expected in ("DataLoader.__next__", "torch.autograd.backward", "sys.excepthook"):
        assert expected in names
    assert "Tensor.backward" not in names  # one backward patch: Tensor.backward calls torch.autograd.backward
    from torch.utils.data import dataloader

    a.close()
    assert patches.active_patches() == []
    assert "__next__" in vars(dataloader._BaseDataLoaderIter)
    assert not hasattr(vars(dataloader._BaseDataLoaderIter)["__next__"], "__wrapped__")
    assert "backward" in vars(torch.Tensor) and not hasattr(torch.Tensor.backward, "__wrapped__")
    assert not hasattr(torch.autograd.backward, "__wrapped__")
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    assert not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks
    b = Agent(RankConfig(), start=False, identity=ident)
    try:
        with b.step_context(m):
            list(DataLoader(TensorDataset(torch.randn(2, 8)), batch_size=1))
            m(torch.randn(1, 8))
        (r,) = rows(b)
        assert r["dataloader_us"] > 0 and r["forward_us"] > 0
    finally:
        b.close()


# --- which loader's waits are carried (issue 15 item 5) ------------------------------------


def test_an_evaluation_loaders_fetches_between_steps_are_not_carried(agent):
    model = SlowForward(sleep_s=0)
    train = iter(DataLoader(TensorDataset(torch.randn(64, 8)), batch_size=1))
    slow_eval = DataLoader(SlowDataset(4), batch_size=1)
    for _ in range(2):
        (x,) = next(train)
        with agent.step_context(model):
            model(x)
    for batch in slow_eval:  # evaluation between two steps: 4 slow fetches
        model(batch)
    (x,) = next(train)
    with agent.step_context(model):
        model(x)
    r = rows(agent)[-1]
    assert r["dataloader_us"] < 4 * SLEEP_US, r  # only the training fetch is carried
    assert r["step_us"] < 4 * SLEEP_US, r
    check_sums(r)


def test_evaluation_between_the_training_fetch_and_its_step_is_not_carried(agent):
    model = SlowForward(sleep_s=0)
    train = iter(DataLoader(SlowDataset(8), batch_size=1))
    fast_eval = DataLoader(TensorDataset(torch.randn(400, 8)), batch_size=1)
    with agent.step_context(model):
        model(next(train))
    x = next(train)  # the training fetch (slow) ...
    for (b,) in fast_eval:  # ... then an evaluation pass before the step
        model(b)
    with agent.step_context(model):
        model(x)
    r = rows(agent)[-1]
    assert r["dataloader_us"] >= SLEEP_US  # the training fetch is carried
    assert r["dataloader_us"] < SLEEP_US + 200_000
    check_sums(r)


def test_a_loop_fetching_inside_its_steps_carries_no_other_loader(agent):
    model = SlowForward(sleep_s=0)
    first = iter(DataLoader(TensorDataset(torch.randn(4, 8)), batch_size=1))
    with agent.step_context(model):
        next(first)
    # fetched inside the step: the training loader; an eval loader between steps is not carried
    for _ in DataLoader(SlowDataset(2), batch_size=1):
        pass
    with agent.step_context(model):
        next(first)
    assert rows(agent)[-1]["step_us"] < 2 * SLEEP_US


def test_a_new_training_loader_fetched_between_steps_is_adopted(agent):
    model = SlowForward(sleep_s=0)
    first = iter(DataLoader(TensorDataset(torch.randn(4, 8)), batch_size=1))
    next(first)
    with agent.step_context(model):
        pass
    other = iter(DataLoader(SlowDataset(4), batch_size=1))  # the script moves on to another loader
    next(other)
    with agent.step_context(model):
        pass
    assert rows(agent)[-1]["dataloader_us"] >= SLEEP_US
    next(first)  # the old loader is now "another loader": not carried
    next(other)
    with agent.step_context(model):
        pass
    r = rows(agent)[-1]
    assert SLEEP_US <= r["dataloader_us"] < 2 * SLEEP_US + 100_000


# --- phase start offsets (issue 15 item 6) ------------------------------------------------


def test_each_phase_records_where_it_started_in_its_step(agent):
    model = SlowForward()
    opt = SlowSGD(model.parameters(), lr=0.1)
    it = iter(DataLoader(SlowDataset(8), batch_size=2))
    x = next(it)
    with agent.step_context(model):
        time.sleep(SLEEP_S)  # residual before the forward
        train_step(model, opt, x)
    (r,) = rows(agent)
    (starts,) = agent.tables["step_time"].recent_starts()  # type: ignore[attr-defined]
    r.update({f"{p}_start_us": v for p, v in starts.items()})
    (t,) = agent.tables["step_time"].recent_timeline()  # type: ignore[attr-defined]
    gaps = dict(zip(STEP_TIMELINE.names, t, strict=True))
    assert gaps["h2d_gap_us"] == 0 and gaps["forward_gap_us"] >= SLEEP_US  # the residual before forward
    assert r["dataloader_start_us"] == 0  # the carried fetch opens the step
    assert r["h2d_start_us"] == -1  # did not run
    assert r["forward_start_us"] >= r["dataloader_us"] + SLEEP_US
    assert r["backward_start_us"] >= r["forward_start_us"] + r["forward_us"]
    assert r["optimizer_start_us"] >= r["backward_start_us"] + r["backward_us"]
    assert r["optimizer_start_us"] + r["optimizer_us"] <= r["step_us"]


def test_regions_record_their_first_start_in_the_step(agent):
    from traceml.runtime.regions import Region

    with agent.step_context(None):
        time.sleep(SLEEP_S)
        with Region("late", lambda: agent.tracker):
            pass
    (row,) = rows(agent, "step_region")
    assert row["start_us"] >= SLEEP_US
    with Region("outside", lambda: agent.tracker):
        pass
    assert rows(agent, "step_region")[-1]["start_us"] == -1


# --- traceml's own cost (issue 19) ------------------------------------------------------------


def test_sampled_steps_measure_tracemls_own_time(agent):
    from traceml.runtime.step import SAMPLE_EVERY

    model = SlowForward(sleep_s=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    it = iter(DataLoader(TensorDataset(torch.randn(400, 8)), batch_size=2))
    for _ in range(SAMPLE_EVERY + 3):
        (x,) = next(it)
        with agent.step_context(model):
            model(x).sum().backward()
            opt.step()
    t = agent.tracker
    assert t.cost_steps == 2  # step 1 and step SAMPLE_EVERY + 1
    per_step_us = t.cost_ns / t.cost_steps / 1000
    assert 0 < per_step_us < rows(agent)[1]["step_us"]  # a part of the step it measured
    assert agent.clock.self_ns == 0  # nothing left over from the sampled step
