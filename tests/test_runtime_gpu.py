"""GPU phase timing.

The event bookkeeping is unit-tested on CPU with stand-in events on a fake GPU clock (the
only mocks here: one room, no GPU).  The real CUDA paths are ``pytest.mark.gpu`` and skip
cleanly where CUDA is unavailable.
"""

from __future__ import annotations

import os

import pytest
import torch

from traceml.config import RankConfig
from traceml.runtime.agent import Agent
from traceml.runtime.cuda import CudaStepMemory, GpuTimer
from traceml.runtime.step import BACKWARD, FORWARD, H2D, OPTIMIZER
from traceml.schema import STEP_GPU
from traceml.transport import RankIdentity

GPU_COLS = STEP_GPU.names


class FakeGpu:
    """A GPU clock in ms: events record 'now'; they complete when ``done_until`` passes them."""

    def __init__(self) -> None:
        self.now = 0.0
        self.done_until = float("inf")
        self.records = 0
        self.fail = False

    def event(self) -> FakeEvent:
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu
        self.t: float | None = None

    def record(self) -> None:
        if self.gpu.fail:
            raise RuntimeError("CUDA error: device lost")
        self.gpu.records += 1
        self.t = self.gpu.now

    def query(self) -> bool:
        assert self.t is not None
        return self.t <= self.gpu.done_until

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.t is not None and end.t is not None
        if not (self.query() and end.query()):
            raise RuntimeError("CUDA error: device not ready")  # what torch raises
        return end.t - self.t


def run_phase(timer: GpuTimer, gpu: FakeGpu, phase: int, ms: float) -> None:
    timer.begin(phase)
    gpu.now += ms
    timer.end(phase)


def as_dicts(rows):
    return [dict(zip(GPU_COLS, r, strict=True)) for r in rows]


def test_phases_sum_per_step_and_resolve_in_order():
    gpu = FakeGpu()
    timer = GpuTimer(gpu.event)
    timer.step_begin()
    run_phase(timer, gpu, FORWARD, 2.0)
    run_phase(timer, gpu, BACKWARD, 3.0)
    run_phase(timer, gpu, FORWARD, 1.0)  # gradient accumulation: a second micro-batch
    run_phase(timer, gpu, BACKWARD, 1.5)
    run_phase(timer, gpu, OPTIMIZER, 0.5)
    gpu.now += 0.25
    timer.step_end(7, 123)
    (row,) = as_dicts(timer.resolve())
    assert row == {
        "step": 7,
        "ts_ns": 123,
        "h2d_gpu_us": 0,
        "forward_gpu_us": 3000,
        "backward_gpu_us": 4500,
        "optimizer_gpu_us": 500,
        "step_gpu_us": 8250,
    }
    assert timer.resolve() == []


def test_unfinished_steps_wait_and_nothing_blocks():
    gpu = FakeGpu()
    timer = GpuTimer(gpu.event)
    for step in range(3):
        timer.step_begin()
        run_phase(timer, gpu, FORWARD, 1.0)
        timer.step_end(step, step)
    gpu.done_until = 1.5  # the GPU has finished step 0 only
    assert [r[0] for r in timer.resolve()] == [0]
    assert timer.pending_steps == 2
    gpu.done_until = float("inf")
    assert [r[0] for r in timer.resolve()] == [1, 2]
    assert timer.resolved_steps == 3


def test_a_phase_on_another_stream_still_running_holds_its_step_back():
    gpu = FakeGpu()
    timer = GpuTimer(gpu.event)
    timer.step_begin()
    run_phase(timer, gpu, FORWARD, 1.0)
    timer.step_end(0, 0)
    slow_stream_end = timer._pending[0][4][0][2]
    slow_stream_end.t = 100.0  # as if recorded on a side stream that finishes late
    gpu.done_until = 50.0  # the step-end event is done, the side stream is not
    assert timer.resolve() == [] and timer.enabled
    gpu.done_until = float("inf")
    (row,) = as_dicts(timer.resolve())
    assert row["step"] == 0 and row["forward_gpu_us"] == 100_000


def test_copies_before_the_step_are_carried_and_eval_phases_dropped():
    gpu = FakeGpu()
    timer = GpuTimer(gpu.event)
    run_phase(timer, gpu, FORWARD, 5.0)  # an eval forward between steps: not this step's
    run_phase(timer, gpu, H2D, 1.0)  # batch.to(device) before `with trace_step`
    timer.step_begin()
    run_phase(timer, gpu, FORWARD, 2.0)
    timer.step_end(0, 0)
    (row,) = as_dicts(timer.resolve())
    assert row["h2d_gpu_us"] == 1000 and row["forward_gpu_us"] == 2000
    assert row["step_gpu_us"] == 3000  # the GPU span starts at the carried copy


def test_cancelled_phase_and_events_are_pooled():
    gpu = FakeGpu()
    created = []

    def factory():
        ev = gpu.event()
        created.append(ev)
        return ev

    timer = GpuTimer(factory)
    for step in range(50):
        timer.step_begin()
        timer.begin(H2D)
        timer.cancel(H2D)  # a .to() that was not a host-to-device copy
        run_phase(timer, gpu, FORWARD, 1.0)
        timer.step_end(step, step)
        rows = timer.resolve()
        assert len(rows) == 1 and rows[0][2] == 0  # no h2d time
    assert len(created) <= 5  # reused from the pool, not one per step


def test_gpu_far_behind_skips_steps_instead_of_growing():
    gpu = FakeGpu()
    gpu.done_until = -1.0  # nothing ever completes
    timer = GpuTimer(gpu.event, max_pending=4)
    for step in range(10):
        timer.step_begin()
        run_phase(timer, gpu, FORWARD, 1.0)
        timer.step_end(step, step)
    assert timer.pending_steps == 4 and timer.skipped_steps == 6
    gpu.done_until = float("inf")
    assert [r[0] for r in timer.resolve()] == [0, 1, 2, 3]


def test_a_failing_event_disables_gpu_timing_only(caplog):
    gpu = FakeGpu()
    timer = GpuTimer(gpu.event)
    gpu.fail = True
    with caplog.at_level("WARNING", logger="traceml.runtime"):
        timer.step_begin()
        run_phase(timer, gpu, FORWARD, 1.0)
        timer.step_end(0, 0)
    assert timer.enabled is False
    assert timer.resolve() == []


def test_agent_wires_the_timer_into_every_phase_wrapper():
    """The real patches drive begin/end: forward wrapper, backward patch, optimizer hooks."""
    agent = Agent(RankConfig(), start=False, identity=RankIdentity(host="t", pid=os.getpid()))
    try:
        gpu = FakeGpu()
        timer = GpuTimer(gpu.event)
        agent.tracker.on_cuda_check = None  # on a CUDA machine: keep the stand-in timer
        agent.gpu_timer = timer
        agent.clock.gpu = timer
        agent.tracker.gpu = timer
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            with agent.step_context(model):
                model(torch.randn(3, 4)).sum().backward()
                opt.step()
        agent._resolve_gpu()
        rows = as_dicts(agent.tables["step_gpu"].recent())
        assert [r["step"] for r in rows] == [0, 1]
        # every phase recorded a begin/end pair: 2 steps x (step + fwd + bwd + opt) x 2 events
        assert gpu.records == 2 * 4 * 2
    finally:
        agent.close()


def test_step_memory_resets_and_reads_the_peaks():
    """Through torch.cuda's functions (no C API given) and through the C API's nested stats."""
    calls = []

    class FakeCuda:
        def reset_peak_memory_stats(self, dev):
            calls.append(("reset", dev))

        def max_memory_allocated(self, dev):
            return 100

        def max_memory_reserved(self, dev):
            return 200

    rows = []
    mem = CudaStepMemory(FakeCuda(), 1, rows.append)
    mem.step_begin()
    mem.step_end(5, 99)
    assert calls == [("reset", 1)] and rows == [(5, 99, 100, 200)]

    class FakeC:
        @staticmethod
        def _cuda_resetPeakMemoryStats(dev):
            calls.append(("c-reset", dev))

        @staticmethod
        def _cuda_memoryStats(dev):
            return {"allocated_bytes": {"all": {"peak": 300}}, "reserved_bytes": {"all": {"peak": 400}}}

    mem = CudaStepMemory(FakeCuda(), 2, rows.append, FakeC)
    mem.step_begin()
    mem.step_end(6, 100)
    assert calls[-1] == ("c-reset", 2) and rows[-1] == (6, 100, 300, 400)


def test_gpu_timing_needs_a_cuda_model_and_a_consumer():
    from traceml.runtime.agent import _model_cuda_device

    assert _model_cuda_device(torch.nn.Linear(2, 2)) is None  # CPU model: not GPU-timed
    assert _model_cuda_device(None) == -1 and _model_cuda_device(torch.nn.ReLU()) == -1
    quiet = Agent(RankConfig(), start=False, identity=RankIdentity(host="t", pid=os.getpid()))
    try:
        assert quiet.sender is None and quiet._gpu_timing is False  # nobody would resolve events
    finally:
        quiet.close()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_real_cuda_training_records_gpu_phases_memory_and_h2d(tmp_path):
    agent = Agent(RankConfig(), start=False, identity=RankIdentity(host="t", pid=os.getpid()), gpu_timing=True)
    try:
        dev = torch.device("cuda", 0)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10)).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = [(torch.randn(256, 1024).pin_memory(), torch.randint(0, 10, (256,))) for _ in range(6)]
        for x, y in data:
            x, y = x.to(dev, non_blocking=True), y.to(dev)
            with agent.step_context(model):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
        agent._drain_gpu(timeout_s=10.0)
        gpu_rows = as_dicts(agent.tables["step_gpu"].recent())
        cpu_rows = agent.tables["step_time"].recent()
        mem_rows = agent.tables["step_memory"].recent()
        assert agent.cuda_device == 0
        # step 0 found CUDA already initialized (model.to): every step is GPU-timed
        assert [r["step"] for r in gpu_rows] == list(range(6))
        for r in gpu_rows:
            assert r["forward_gpu_us"] > 0 and r["backward_gpu_us"] > 0 and r["optimizer_gpu_us"] > 0
            # the GPU timer starts at step 0's start: step 0's carried copy has CPU time only
            assert r["h2d_gpu_us"] > 0 or r["step"] == 0
            assert r["step_gpu_us"] >= r["forward_gpu_us"] + r["backward_gpu_us"]
        assert all(row[5] > 0 for row in cpu_rows)  # h2d_us on the CPU clock too
        assert [m[0] for m in mem_rows] == list(range(6))
        assert all(m[2] > 0 and m[3] >= m[2] for m in mem_rows)
        assert agent.gpu_timer._record_on_stream is not None  # the C-API fast path is in use
        from traceml.runtime.samplers import ProcessSampler

        sample = ProcessSampler(cuda_device=lambda: agent.cuda_device).sample()
        assert sample[5] > 0 and sample[6] >= sample[5] and sample[7] > sample[6]
    finally:
        agent.close()
    assert agent.clock.gpu is None


@pytest.mark.gpu
@cuda
def test_real_cuda_nvml_sampler_reads_every_gpu():
    from traceml.runtime.samplers import NvmlSampler

    sampler = NvmlSampler(node_rank=0, clock=lambda: 42)
    rows = sampler.sample()
    assert len(rows) == torch.cuda.device_count()
    for idx, row in enumerate(rows):
        assert row[0] == 42 and row[2] == idx
        assert 0 <= row[3] <= 100 and row[5] > 0 and 0 < row[4] <= row[5]


@pytest.mark.gpu
@cuda
def test_real_cuda_machine_with_a_cpu_model_is_not_gpu_timed():
    torch.zeros(1, device="cuda")  # CUDA is initialized, but the model stays on the CPU
    agent = Agent(RankConfig(), start=False, identity=RankIdentity(host="t", pid=os.getpid()), gpu_timing=True)
    try:
        model = torch.nn.Linear(8, 8)
        for _ in range(3):
            with agent.step_context(model):
                model(torch.randn(2, 8)).sum().backward()
        assert agent.gpu_timer is None and agent.tracker.on_cuda_check is None
        assert agent.tables["step_gpu"].appended == 0 and agent.tables["step_memory"].appended == 0
        cuda_model = torch.nn.Linear(8, 8).cuda()
        with agent.step_context(cuda_model):  # a model on the GPU re-arms the check
            cuda_model(torch.randn(2, 8, device="cuda")).sum().backward()
        assert agent.gpu_timer is not None and agent.tables["step_memory"].appended == 1
    finally:
        agent.close()


@pytest.mark.gpu
@cuda
def test_environment_never_initializes_cuda_in_a_cpu_process():
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from traceml.runtime.samplers import NvmlSampler, ProcessSampler, collect_environment\n"
        "list(DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))\n"
        "env = collect_environment({})\n"
        "ProcessSampler(cuda_device=lambda: 0).sample()\n"
        "NvmlSampler(0).sample()\n"
        "print('initialized', torch.cuda.is_initialized(), 'cuda', env['cuda'] != '')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "initialized False cuda True" in out.stdout
