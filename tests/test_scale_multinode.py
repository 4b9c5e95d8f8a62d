"""Multi-node on one machine: two ``traceml run --nnodes 2 --node-rank 0|1`` with 2 processes
each, one torchrun rendezvous on 127.0.0.1, node 1 streaming to node 0's aggregator with the
shared token, make ONE recording with all 4 ranks.

Everything on loopback: node 0's aggregator listens on 127.0.0.1 and node 1 is given
``--aggregator-host 127.0.0.1``, ``--aggregator-port`` and ``--token`` of node 0.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import fault_harness as h

from traceml.cli.launch_plan import free_port
from traceml.format import open_recording

pytestmark = pytest.mark.slow
STEPS = 200


def test_two_nodes_on_loopback_make_one_recording_of_four_ranks(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    master_port = free_port()
    agg_port = free_port()
    common = ["--ui", "none", "--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    common += ["--master-port", str(master_port), "--aggregator-port", str(agg_port), "--token", token]
    script = [h.FAULT_STEPS, "--steps", str(STEPS), "--rate", "200"]
    nodes = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        args = [
            *common,
            "--node-rank",
            str(node),
            "--aggregator-host",
            "127.0.0.1",
            "--out",
            str(cwd / "run.tml"),
            *script,
        ]
        nodes.append(h.LiveRun(args, cwd))
    codes = [n.finish(timeout=240) for n in nodes]
    assert codes == [0, 0], "\n".join(n.err[-1500:] for n in nodes)
    for node in nodes:
        assert node.out.count("done rank=") == 2, node.out
    assert "streaming to node 0's aggregator" in nodes[1].out
    assert not (tmp_path / "node1" / "run.tml").exists(), "node 0 records every rank"

    rec = open_recording(tmp_path / "node0" / "run.tml")
    assert rec.integrity["status"] == "complete", rec.integrity
    assert rec.header["world_size"] == 4
    steps = rec.read_table("step_time")
    assert {rank: cols["step"].tolist() for rank, cols in steps.items()} == {r: list(range(STEPS)) for r in range(4)}
    ranks = sorted((r["rank"], r["node_rank"], r["state"]) for r in rec.attachments["ranks"]["ranks"])
    assert ranks == [(0, 0, "finished"), (1, 0, "finished"), (2, 1, "finished"), (3, 1, "finished")]
    assert {f"environment/rank{r}" for r in range(4)} <= set(rec.attachments)
    assert rec.attachments["exit"]["status"] == "ok"
