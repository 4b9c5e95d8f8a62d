"""Many ranks, one aggregator, a whole node lost: 64 synthetic ranks on 8 nodes over loopback
(the real wire, a real ``python -m traceml.aggregator``); node 3 vanishes mid-run (sockets reset,
unsent rows gone).  The recording keeps every row the others sent and says which ranks were
lost, after which step and when."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from swarm_load import run_swarm

from traceml.aggregator.lost import _span, lost_lines
from traceml.format import open_recording


def test_a_lost_node_is_named_in_the_recording_with_its_last_steps(tmp_path: Path) -> None:
    res = run_swarm(tmp_path, ranks=64, rate=10.0, seconds=4.0, nodes=8, kill_node=(3, 2.0))
    assert res.aggregator_code == 0, res.aggregator_stderr[-2000:]
    assert res.killed == list(range(24, 32))
    assert "node 3 lost: ranks 24-31 vanished after step" in res.aggregator_stderr

    with open_recording(res.out) as rec:
        assert rec.integrity["status"] == "complete"
        steps = rec.read_table("step_time")
        lost = rec.attachments["lost"]
        ranks = {r["rank"]: r for r in rec.attachments["ranks"]["ranks"]}
    # every rank that lived: every step it made, in order, nothing dropped
    for rank in range(64):
        if rank in res.killed:
            continue
        assert steps[rank]["step"].tolist() == list(range(res.steps_made[rank])), rank
        assert ranks[rank]["state"] == "finished"
    # the lost node: which ranks, their last step as recorded, and when they went
    assert [r["rank"] for r in lost["ranks"]] == res.killed
    (node,) = lost["nodes"]
    assert node["node_rank"] == 3 and node["whole"] and node["ranks"] == res.killed and node["ranks_seen"] == 8
    for entry in lost["ranks"]:
        got = steps.get(entry["rank"])
        last = int(got["step"].max()) if got is not None else -1
        assert entry["last_step"] == last and 10 <= last <= 25  # killed 2 s into 10 steps/s
        assert entry["died_ns"] >= res.killed_at_ns > entry["last_seen_ns"] > 0
        assert ranks[entry["rank"]]["state"] == "died"
    assert lost["never_connected"] == []


def test_lost_lines_name_whole_and_partial_nodes() -> None:
    lost = {
        "nodes": [
            {"node_rank": 1, "ranks": [8, 9, 10, 11], "ranks_seen": 4, "whole": True, "last_step_min": 7,
             "last_step_max": 9},
            {"node_rank": 2, "ranks": [17], "ranks_seen": 8, "whole": False, "last_step_min": 3, "last_step_max": 3},
        ],
        "never_connected": [30, 31],
    }  # fmt: skip
    assert lost_lines(lost) == [
        "node 1 lost: ranks 8-11 vanished after steps 7..9",
        "node 2: ranks 17 of 8 vanished after step 3",
        "ranks 30-31 never connected",
    ]
    assert _span([5, 1, 2, 3, 9]) == "1-3, 5, 9"
