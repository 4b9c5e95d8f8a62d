"""Resource rules (``traceml.diagnosis.pressure``) past and under their thresholds, on hand-built stores."""

from __future__ import annotations

from typing import Any

from traceml.diagnosis import diagnose
from traceml.diagnosis import thresholds as th
from traceml.schema import PROCESS, STEP_TIME, SYSTEM, SYSTEM_GPU, rows_to_columns
from traceml.store import ColumnStore

GIB = 2**30
T0 = 10**12


def _store(ranks: int = 1) -> ColumnStore:
    store = ColumnStore()
    for r in range(ranks):
        steps = [(s, T0 + s * 10**8, 0, 100_000, 0, 0, 30_000, 60_000, 5_000, 5_000) for s in range(40)]
        store.append(r, "step_time", rows_to_columns(STEP_TIME, steps), schema=STEP_TIME)
    return store


def _process(store: ColumnStore, rank: int, rss: float, reserved: float = -1, total: float = -1) -> None:
    rows = [(T0 + i * 10**9, 50.0, int(rss), 10, 20, int(reserved), int(reserved), int(total)) for i in range(5)]
    store.append(rank, "process", rows_to_columns(PROCESS, rows), schema=PROCESS)


def _kinds(view: Any) -> dict[str, Any]:
    return {f.kind: f for f in diagnose(view).findings}


def test_gpu_memory_near_capacity() -> None:
    store = _store()
    _process(store, 0, 2 * GIB, reserved=0.95 * 80 * GIB, total=80 * GIB)
    f = _kinds(store.snapshot())["MEMORY_PRESSURE"]
    assert f.severity == "warn" and f.labels == {"resource": "gpu"} and f.rank == 0
    store = _store()
    _process(store, 0, 2 * GIB, reserved=0.85 * 80 * GIB, total=80 * GIB)
    assert "MEMORY_PRESSURE" not in _kinds(store.snapshot())


def test_host_ram_near_capacity_and_cpu_saturation() -> None:
    store = _store()
    rows = [(T0 + i * 10**9, 0, 99.0, int(0.98 * 64 * GIB), 64 * GIB) for i in range(30)]
    store.append(0, "system", rows_to_columns(SYSTEM, rows), schema=SYSTEM)
    k = _kinds(store.snapshot())
    # 98 % is past MEM_PRESSURE_CRITICAL, but the window holds fewer than MIN_STEPS_CRITICAL samples
    assert k["MEMORY_PRESSURE"].labels == {"resource": "host"} and k["MEMORY_PRESSURE"].severity == "warn"
    assert k["HOST_SATURATION"].severity == "info" and k["HOST_SATURATION"].labels == {"level": "critical"}
    store = _store()
    rows = [(T0 + i * 10**9, 0, 60.0, int(0.5 * 64 * GIB), 64 * GIB) for i in range(30)]
    store.append(0, "system", rows_to_columns(SYSTEM, rows), schema=SYSTEM)
    k = _kinds(store.snapshot())
    assert "MEMORY_PRESSURE" not in k and "HOST_SATURATION" not in k


def test_memory_imbalance_between_ranks() -> None:
    store = _store(ranks=2)
    _process(store, 0, 2 * GIB)
    _process(store, 1, 6 * GIB)
    f = _kinds(store.snapshot())["MEMORY_IMBALANCE"]
    assert f.rank == 1 and f.labels == {"resource": "host"} and f.severity == "critical"
    store = _store(ranks=2)
    _process(store, 0, 5 * GIB)
    _process(store, 1, 5.5 * GIB)  # 9 % apart: under MEM_IMBALANCE_WARN
    assert "MEMORY_IMBALANCE" not in _kinds(store.snapshot())
    assert th.MEM_IMBALANCE_WARN > 0.09


def test_hot_gpu() -> None:
    def run(temp: float) -> dict[str, Any]:
        store = _store()
        rows = [(T0 + i * 10**9, 0, 0, 95.0, GIB, 80 * GIB, temp, 300.0, 400.0) for i in range(10)]
        store.append(0, "system_gpu", rows_to_columns(SYSTEM_GPU, rows), schema=SYSTEM_GPU)
        return _kinds(store.snapshot())

    assert run(91.0)["GPU_THERMAL"].severity == "warn"  # critical needs MIN_STEPS_CRITICAL samples
    assert "GPU_THERMAL" not in run(70.0)
