"""Load, short version: 16 synthetic ranks (real processes running the rank runtime) at 1,000
steps/s each for a few seconds, streaming over loopback to one real aggregator process.
Nothing is lost, or every drop is counted: for every rank, rows recorded + rows it reported
dropped = steps it ran; the drops are in the recording's ``ranks`` attachment, in the view
(``live_model``) and in the aggregator's summary.  One rank keeps only 64 rows per table, so
it really drops rows.  ``benchmarks/bench_load.py`` runs the 60 s version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from fault_load import run_load

import replay
from traceml.format import open_recording
from traceml.views import live_model

pytestmark = pytest.mark.slow
RANKS = 16
RATE = 1000.0
SECONDS = 3.0


def test_sixteen_ranks_at_a_thousand_steps_per_second_lose_nothing_uncounted(tmp_path: Path) -> None:
    res = run_load(tmp_path, ranks=RANKS, rate=RATE, seconds=SECONDS, small_capacity_ranks=1)
    assert res.rank_codes == dict.fromkeys(range(RANKS), 0)
    assert res.aggregator_code == 0, res.aggregator_stderr[-3000:]

    rec = open_recording(res.out)
    assert rec.integrity["status"] == "complete", rec.integrity
    recorded = {rank: cols["step"] for rank, cols in rec.read_table("step_time").items()}
    infos = {r["rank"]: r for r in rec.attachments["ranks"]["ranks"]}
    small = RANKS - 1
    for rank in range(RANKS):
        steps = recorded[rank]
        assert len(np.unique(steps)) == len(steps) and np.all(np.diff(steps) > 0), (
            f"rank {rank}: duplicates or disorder"
        )
        dropped = infos[rank]["drops"].get("step_time", 0)
        assert len(steps) + dropped == res.steps[rank], (
            f"rank {rank}: {len(steps)} recorded + {dropped} dropped != {res.steps[rank]} run"
        )
        assert infos[rank]["state"] == "finished"
        if rank != small:
            assert dropped == 0, f"rank {rank} dropped {dropped} rows with room for 16384"
    small_drops = sum(infos[small]["drops"].values())
    assert small_drops > 0, "the 64-row rank must overflow its tables"

    view = replay.open(res.out).view()
    model = live_model(view)
    assert model.drops_total == small_drops
    assert {r.rank: r.drops for r in model.ranks} == {r: (small_drops if r == small else 0) for r in range(RANKS)}
    assert (
        f"rows dropped: {small_drops}" in res.aggregator_stdout
        or f"{small_drops} rows dropped" in res.aggregator_stdout
    )
