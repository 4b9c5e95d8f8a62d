"""The live store's memory per row does not depend on how small the batches are.

A rank's sender ships whatever rows it has every ~0.5 s: the 1 Hz samples (``process``,
``system``) arrive one row per batch, and so does ``step_time`` when a step takes longer than
half a second.  Kept as they arrive (a dict and one array per column per batch), such rows cost
the aggregator -- and a rank recording its own file -- ~1.5 KB each instead of their ~50 B of
data, until a snapshot compacts them; the aggregator without a live view never takes one.
``benchmarks/bench_aggregator_memory.py`` measures the same thing with the whole aggregator.
"""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest

from traceml.schema import PROCESS, STEP_TIME
from traceml.store import ColumnStore
from traceml.transport import encode_columns
from traceml.transport.codec import decode_columns

PROCESS_ROW_BYTES = 8 + 4 + 8 + 4 + 4 + 8 + 8 + 8


def wire_batch(i: int, n: int = 1) -> dict:
    """``n`` process rows as the aggregator gets them: decoded from msgpack (arrays over bytes)."""
    cols = {
        "ts_ns": [1_700_000_000_000_000_000 + i * n + k for k in range(n)],
        "cpu_pct": [97.5] * n,
        "rss_bytes": [(2 << 30) + i] * n,
        "threads": [24] * n,
        "fds": [80] * n,
        "gpu_alloc_bytes": [-1] * n,
        "gpu_reserved_bytes": [-1] * n,
        "gpu_total_bytes": [-1] * n,
    }
    wire = msgpack.unpackb(msgpack.packb(encode_columns(PROCESS, cols)))
    _, decoded = decode_columns(wire, "process")
    return decoded


def test_one_row_batches_cost_about_their_data() -> None:
    store = ColumnStore(capacity=None)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3000):  # decoded while traced: the payload bytes the arrays keep count too
            store.append(0, "process", wire_batch(i), PROCESS)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_row = held / 3000
    # 52 B of data per row; kept batch by batch it was ~1,500 B
    assert per_row < 4 * PROCESS_ROW_BYTES, f"{per_row:.0f} B per one-row batch held"


@pytest.mark.parametrize("capacity", [None, 1, 7, 100, 1000, 5000])
def test_rows_and_evictions_are_unchanged_by_coalescing(capacity: int | None) -> None:
    rng = np.random.default_rng(0)
    store = ColumnStore(capacity=capacity)
    sent: list[int] = []
    views = []
    # mixed batch sizes (small ones merged, big ones kept as they come), evictions, snapshots
    for i, n in enumerate(rng.choice([1, 1, 2, 5, 39, 300], 400), start=1):
        cols = wire_batch(i, int(n))
        sent.extend(int(t) for t in cols["ts_ns"])
        store.append(3, "process", cols, PROCESS)
        if i % 50 == 0:
            views.append((len(sent), store.snapshot()))  # snapshots in between compact the series
    for count, view in views:  # a view taken earlier still shows exactly what it held
        kept = sent[:count][-capacity:] if capacity else sent[:count]
        assert view.columns("process", 3)["ts_ns"].tolist() == kept
    view = store.snapshot()
    kept = sent[-capacity:] if capacity else sent
    ts = view.columns("process", 3)["ts_ns"]
    assert ts.tolist() == kept
    assert view.evicted.get(("process", 3), 0) == len(sent) - len(kept)
    assert all(len(a) == len(ts) for a in view.columns("process", 3).values())


def test_coalescing_keeps_str_columns() -> None:
    from traceml.schema import STEP_REGION

    store = ColumnStore(capacity=None)
    names = []
    for i in range(300):
        cols = {"step": [i], "ts_ns": [i], "name": [f"region{i % 3}"], "cpu_us": [i], "calls": [1], "start_us": [0]}
        names.append(f"region{i % 3}")
        _, decoded = decode_columns(msgpack.unpackb(msgpack.packb(encode_columns(STEP_REGION, cols))), "step_region")
        store.append(0, "step_region", decoded, STEP_REGION)
    got = store.snapshot().columns("step_region", 0)
    assert list(got["name"]) == names and got["step"].tolist() == list(range(300))


def test_step_rows_in_one_row_batches_stay_small() -> None:
    store = ColumnStore(capacity=None)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            cols = {c.name: [0 if c.name == "failed" else i] for c in STEP_TIME.columns}
            _, decoded = decode_columns(msgpack.unpackb(msgpack.packb(encode_columns(STEP_TIME, cols))), "step_time")
            store.append(0, "step_time", decoded, STEP_TIME)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / 2000 < 4 * 73, f"{held / 2000:.0f} B per one-row step batch held"
