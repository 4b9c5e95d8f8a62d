"""Samplers with injected clocks, the sampler thread, and the run environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import psutil
import pytest

from traceml.config import RankConfig
from traceml.runtime import _failopen
from traceml.runtime.agent import Agent
from traceml.runtime.samplers import (
    NvmlSampler,
    ProcessSampler,
    SamplerThread,
    SystemSampler,
    collect_environment,
    git_commit,
)
from traceml.runtime.samplers import nvml as nvml_mod
from traceml.schema import PROCESS, SYSTEM, SYSTEM_GPU
from traceml.store import BoundedTable
from traceml.transport import RankIdentity


@pytest.fixture(autouse=True)
def fresh_log_once(monkeypatch):
    monkeypatch.setattr(_failopen, "_seen", set())


def test_process_sampler_reads_this_process_with_the_injected_clock():
    sampler = ProcessSampler(clock=lambda: 1234, cuda_device=lambda: 0)
    sum(i * i for i in range(200_000))  # some CPU time to measure
    row = dict(zip(PROCESS.names, sampler.sample(), strict=True))
    assert row["ts_ns"] == 1234
    assert row["rss_bytes"] == pytest.approx(psutil.Process().memory_info().rss, rel=0.5)
    assert row["threads"] >= 1 and row["fds"] >= 3
    assert row["cpu_pct"] >= 0.0
    if "torch" not in sys.modules or not sys.modules["torch"].cuda.is_initialized():
        assert (row["gpu_alloc_bytes"], row["gpu_reserved_bytes"], row["gpu_total_bytes"]) == (-1, -1, -1)


def test_system_sampler_reports_the_node():
    row = dict(zip(SYSTEM.names, SystemSampler(node_rank=3, clock=lambda: 7).sample(), strict=True))
    vm = psutil.virtual_memory()
    assert row["ts_ns"] == 7 and row["node_rank"] == 3
    assert row["ram_total_bytes"] == vm.total
    assert 0 < row["ram_used_bytes"] < vm.total
    assert 0.0 <= row["cpu_pct"] <= 100.0 * psutil.cpu_count()


def test_nvml_failure_is_tried_once_cached_and_logged_once(monkeypatch, caplog):
    import pynvml

    tries = []

    def failing_init():
        tries.append(1)
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(nvml_mod, "_nvml", None)
    monkeypatch.setattr(pynvml, "nvmlInit", failing_init)
    with caplog.at_level("INFO", logger="traceml.runtime"):
        samplers = [NvmlSampler(node_rank=0) for _ in range(3)]
    assert len(tries) == 1
    assert all(not s.available and s.sample() == [] for s in samplers)
    lines = [r.getMessage() for r in caplog.records if "NVML unavailable" in r.getMessage()]
    assert len(lines) == 1 and "system_gpu rows are not recorded" in lines[0]


def test_nvml_sampler_converts_units_and_tolerates_unsupported_metrics():
    class NotSupported(Exception):
        pass

    mem = types.SimpleNamespace(used=3 << 30, total=80 << 30)

    def no_power(h):
        raise NotSupported("power readings not supported")

    fake = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetMemoryInfo=lambda h: mem,
        nvmlDeviceGetTemperature=lambda h, kind: 61,
        nvmlDeviceGetPowerUsage=lambda h: 250_500 if h == "gpu0" else no_power(h),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
    )
    sampler = NvmlSampler(node_rank=1, clock=lambda: 5, nvml=fake)
    rows = [dict(zip(SYSTEM_GPU.names, r, strict=True)) for r in sampler.sample()]
    assert [r["gpu_idx"] for r in rows] == [0, 1]
    first, second = rows
    assert first["util_pct"] == 87.0 and first["temp_c"] == 61.0
    assert first["power_w"] == 250.5 and first["power_limit_w"] == 700.0
    assert first["mem_used_bytes"] == 3 << 30 and first["mem_total_bytes"] == 80 << 30
    assert first["node_rank"] == 1 and first["ts_ns"] == 5
    assert second["power_w"] != second["power_w"]  # nan: not supported, not an error


def test_sampler_thread_drops_a_failing_sampler_and_keeps_the_others(caplog):
    table = BoundedTable(SYSTEM, 16)
    ticks = []

    def broken():
        raise OSError("/proc went away")

    thread = SamplerThread(
        [("broken", broken, table.append), ("fine", lambda: (1, 0, 1.0, 2, 3), table.append)],
        interval_s=60,
        on_tick=lambda: ticks.append(1),
    )
    with caplog.at_level("WARNING", logger="traceml.runtime"):
        thread.tick()
        thread.tick()
    assert [name for name, _, _ in thread.samplers] == ["fine"]
    assert len(table.recent()) == 2 and len(ticks) == 2
    assert sum("the broken sampler failed" in r.getMessage() for r in caplog.records) == 1


def test_sampler_thread_ticks_on_its_interval_and_stops():
    table = BoundedTable(SYSTEM, 64)
    thread = SamplerThread([("x", lambda: [(1, 0, 1.0, 2, 3)] * 2, table.append)], interval_s=0.01)
    thread.start()
    deadline = time.monotonic() + 30
    while thread.ticks < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread.stop()
    assert not thread.alive
    assert thread.ticks >= 3 and len(table.recent()) == 2 * thread.ticks


def test_git_commit_of_the_scripts_repository(tmp_path):
    repo = tmp_path / "proj"
    repo.mkdir()
    script = repo / "train.py"
    script.write_text("print('hi')\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    for cmd in (["init", "-q"], ["add", "train.py"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env, capture_output=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit(str(script)) == head.strip() and len(head.strip()) == 40
    assert git_commit(str(tmp_path / "elsewhere" / "x.py")) == ""
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_commit(str(outside)) == ""
    assert git_commit(None) == ""


def test_environment_names_the_rank_torch_and_the_command():
    import torch

    ident = RankIdentity(rank=2, local_rank=0, world_size=4, local_world_size=2, node_rank=1, host="h", pid=9)
    env = collect_environment(ident.to_dict(), wrapper="DDP", script=__file__)
    assert env["rank"] == 2 and env["world_size"] == 4 and env["node_rank"] == 1 and env["host"] == "h"
    assert env["torch"] == torch.__version__ and env["wrapper"] == "DDP"
    assert env["script"] == os.path.abspath(__file__)
    assert env["backend"] == "" and env["dist_world_size"] == 0  # no process group here
    assert env["command"] == [str(a) for a in sys.argv]
    assert len(env["git_commit"]) in (0, 40)
    import msgpack

    assert msgpack.unpackb(msgpack.packb(env)) == env  # it travels as an attachment


def test_only_local_rank_zero_samples_the_system(monkeypatch):
    monkeypatch.setattr(nvml_mod, "_nvml", "no NVML in this test")
    port_cfg = RankConfig(aggregator_host="127.0.0.1", aggregator_port=9, token="t")
    names = {}
    for local_rank in (0, 1):
        ident = RankIdentity(rank=local_rank, local_rank=local_rank, world_size=2, local_world_size=2, host="h", pid=1)
        agent = Agent(port_cfg, start=False, identity=ident, drain_timeout_s=0.01)
        try:
            assert agent.sampler is not None
            names[local_rank] = [name for name, _, _ in agent.sampler.samplers]
        finally:
            agent.close()
    assert names == {0: ["process", "system"], 1: ["process"]}
