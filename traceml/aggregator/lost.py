"""Lost ranks: which ranks vanished without finishing, at which step and when, grouped by node.

Pure: ``StoreView -> dict`` (msgpack-able; stored as the recording's ``lost`` attachment).
"""

from __future__ import annotations

from typing import Any

from traceml.store import StoreView

LOST_STATES = frozenset({"died"})


def lost_ranks(view: StoreView, expected_ranks: int | None = None) -> dict[str, Any]:
    """``{"ranks": [...], "nodes": [...], "never_connected": [...]}``; empty lists when nothing was lost.

    Per rank: ``rank``, ``node_rank``, ``host``, ``last_step`` (the last step the aggregator got,
    -1 for none), ``last_step_ns`` (its ``ts_ns``), ``last_seen_ns`` and ``died_ns``.  Per node:
    ``node_rank``, ``ranks`` lost, ``ranks_seen`` on it, ``whole`` and the span of ``died_ns``.
    """
    lost: list[dict[str, Any]] = []
    seen_by_node: dict[int, list[int]] = {}
    for rank in sorted(view.rank_info):
        info = view.rank_info[rank]
        seen_by_node.setdefault(info.node_rank, []).append(rank)
        if info.state not in LOST_STATES:
            continue
        steps = view.columns("step_time", rank)
        step = steps.get("step")
        ts = steps.get("ts_ns")
        if step is not None and len(step):
            i = int(step.argmax())
            last_step, last_step_ns = int(step[i]), int(ts[i]) if ts is not None and len(ts) > i else -1
        else:
            last_step, last_step_ns = -1, -1
        lost.append(
            {
                "rank": rank,
                "node_rank": info.node_rank,
                "host": info.host,
                "last_step": last_step,
                "last_step_ns": last_step_ns,
                "last_seen_ns": info.last_seen_ns,
                "died_ns": info.died_ns,
            }
        )
    nodes = []
    for node in sorted({r["node_rank"] for r in lost}):
        ranks = [r for r in lost if r["node_rank"] == node]
        died = [r["died_ns"] for r in ranks if r["died_ns"] > 0]
        nodes.append(
            {
                "node_rank": node,
                "ranks": [r["rank"] for r in ranks],
                "ranks_seen": len(seen_by_node.get(node, [])),
                "whole": len(ranks) == len(seen_by_node.get(node, [])),
                "first_died_ns": min(died, default=0),
                "last_died_ns": max(died, default=0),
                "last_step_min": min(r["last_step"] for r in ranks),
                "last_step_max": max(r["last_step"] for r in ranks),
            }
        )
    never = [] if expected_ranks is None else sorted(set(range(expected_ranks)) - set(view.rank_info))
    return {"ranks": lost, "nodes": nodes, "never_connected": never}


def lost_lines(lost: dict[str, Any], limit: int = 8) -> list[str]:
    """One plain line per lost node (whole or not), then the ranks that never connected."""
    out = []
    for node in lost.get("nodes", [])[:limit]:
        lo, hi = node["last_step_min"], node["last_step_max"]
        steps = f"step {lo}" if lo == hi else f"steps {lo}..{hi}"
        if node["whole"]:
            out.append(f"node {node['node_rank']} lost: ranks {_span(node['ranks'])} vanished after {steps}")
        else:
            out.append(
                f"node {node['node_rank']}: ranks {_span(node['ranks'])} of {node['ranks_seen']} vanished after {steps}"
            )
    never = lost.get("never_connected", [])
    if never:
        out.append(f"ranks {_span(never)} never connected")
    return out


def _span(ranks: list[int]) -> str:
    """``0-7, 9`` for [0..7, 9]."""
    parts = []
    start = prev = None
    for r in sorted(ranks):
        if prev is not None and r == prev + 1:
            prev = r
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = r
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)
