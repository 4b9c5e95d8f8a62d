"""End-of-run view model: the compact one-screen summary ``traceml run`` prints at the end.

Pure; figures use the steps ``summary.json`` analyses and :mod:`traceml.views.measures`, so screen and report agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from traceml.store import StoreView
from traceml.store.view import META_RUN_NAME
from traceml.views.live import (
    PhaseRow,
    RankRow,
    RecordingInfo,
    measures,
    phase_rows_of,
    rank_rows,
    recording_info,
    region_rows_of,
)
from traceml.views.measures import run_duration_s

#: at most this many findings are listed on the summary screen
MAX_FINDINGS = 6


@dataclass(frozen=True)
class FindingLine:
    severity: str  # "info" | "warn" | "critical"
    kind: str
    rank: int | None
    text: str


@dataclass(frozen=True)
class FinalModel:
    run_name: str
    #: "ok" | "failed" | "interrupted" | "unknown"
    status: str
    exit_code: int | None
    signal: str
    duration_s: float
    #: steps held per rank summed over ranks (evicted live rows included)
    total_steps: int
    phases: tuple[PhaseRow, ...]
    skew_pct: float
    slowest_rank: int
    ranks: tuple[RankRow, ...]
    #: the primary diagnosis first, then the other findings, most severe first
    findings: tuple[FindingLine, ...]
    #: findings left off the screen
    more_findings: int
    drops_total: int
    recording: RecordingInfo
    #: "traceml cost X µs per step (Y%)" from the summary; "" when not measured
    cost: str = ""
    #: measured steps per second over the analysed steps (time between steps included)
    steps_per_s: float = float("nan")
    #: share (percent) of the analysed steps' wall time outside any step
    outside_pct: float = float("nan")
    #: named regions entered in the analysed steps, largest share first
    regions: tuple[PhaseRow, ...] = ()
    #: regions timed between steps: (name, percent of the wall time)
    between_regions: tuple[tuple[str, float], ...] = ()
    #: distinct steps analysed (after the warm-up)
    analysed_steps: int = 0


def _finding(d: Mapping[str, Any]) -> FindingLine | None:
    if not isinstance(d, Mapping):
        return None
    rank = d.get("rank")
    return FindingLine(
        severity=str(d.get("severity", "info")),
        kind=str(d.get("kind", "")),
        rank=int(rank) if isinstance(rank, int) else None,
        text=str(d.get("summary", "") or d.get("message", "")),
    )


def findings_from_summary(summary: Any) -> list[FindingLine]:
    """Findings from a diagnosis summary dict: ``primary`` first, then ``findings``, deduplicated.

    Accepts the dict itself or one that nests it under ``"diagnosis"``; anything else gives [].
    """
    if not isinstance(summary, Mapping):
        return []
    nested = summary.get("diagnosis")
    diag: Mapping[str, Any] = nested if isinstance(nested, Mapping) else summary
    out: list[FindingLine] = []
    seen: set[tuple[str, int | None, str]] = set()
    raw = [diag.get("primary")] + list(diag.get("findings") or [])
    for item in raw:
        line = _finding(item) if item is not None else None
        if line is None:
            continue
        key = (line.kind, line.rank, line.text)
        if key not in seen:
            seen.add(key)
            out.append(line)
    return out


def final_model(view: StoreView) -> FinalModel:
    exit_info = view.attachments.get("exit")
    exit_info = exit_info if isinstance(exit_info, Mapping) else {}
    code = exit_info.get("exit_code")
    findings = findings_from_summary(view.attachments.get("summary"))
    data, m = measures(view, None)
    ranks = rank_rows(view, None, data)
    duration = run_duration_s(view)
    return FinalModel(
        run_name=str(view.meta.get(META_RUN_NAME, "") or ""),
        status=str(exit_info.get("status", "unknown") or "unknown"),
        exit_code=int(code) if isinstance(code, int) else None,
        signal=str(exit_info.get("signal", "") or ""),
        duration_s=duration if duration == duration else 0.0,
        total_steps=sum(r.steps for r in ranks),
        phases=phase_rows_of(m),
        skew_pct=m.skew_pct,
        slowest_rank=m.slowest_rank,
        ranks=ranks,
        findings=tuple(findings[:MAX_FINDINGS]),
        more_findings=max(0, len(findings) - MAX_FINDINGS),
        drops_total=view.dropped(),
        recording=recording_info(view),
        cost=_cost_text(view.attachments.get("summary")),
        steps_per_s=m.throughput_steps_per_s,
        outside_pct=100.0 * m.outside_share,
        regions=region_rows_of(m),
        between_regions=tuple((n, 100.0 * v) for n, v in m.between_regions.items()),
        analysed_steps=m.steps,
    )


def _cost_text(summary: Any) -> str:
    return traceml_cost_text(summary) if isinstance(summary, Mapping) else ""


def traceml_cost_text(summary: Mapping[str, Any]) -> str:
    """``traceml cost 7.9 µs per step (1.2%)`` from a summary's ``traceml`` section; "" when the
    run did not measure it.  The one wording of every view, report and the compare output."""
    sec = summary.get("traceml")
    if not isinstance(sec, Mapping):
        return ""
    us = sec.get("overhead_us_per_step")
    if not isinstance(us, int | float):
        return ""
    share = sec.get("overhead_share")
    pct = f" ({share * 100:.2g}%)" if isinstance(share, int | float) else ""
    return f"traceml cost {us:.1f} µs per step{pct}"
