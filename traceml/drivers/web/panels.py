"""The page's text panels as Dash components: run and rank tables, the diagnosis (recorded or
computed here, never fatal to the page), the live verdict, the residual's stack profile and the
statistics line above the charts."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from dash import html

from traceml import views
from traceml.drivers.web.layout import CSS, GREY
from traceml.store import StoreView
from traceml.views import FindingLine, findings_from_summary

log = logging.getLogger(__name__)
_SEVERITY_COLOUR = {"critical": "#dc2626", "warn": "#d97706"}


def kv_table(rows: Sequence[tuple[str, str]], id_: str | None = None) -> html.Table:
    body = [html.Tr([html.Td(k, style={**CSS["cell"], "color": GREY}), html.Td(v, style=CSS["cell"])]) for k, v in rows]
    if id_:
        return html.Table(html.Tbody(body), style=CSS["table"], id=id_)
    return html.Table(html.Tbody(body), style=CSS["table"])


def rank_table(rows: Sequence[tuple[str, ...]]) -> html.Table:
    head = html.Tr(
        [
            html.Th(h, style={**CSS["cell"], "textAlign": "left"})
            for h in ("rank", "host", "state", "exit", "steps", "dropped")
        ]
    )
    body = [html.Tr([html.Td(c, style=CSS["cell"]) for c in row]) for row in rows]
    return html.Table([html.Thead(head), html.Tbody(body)], style=CSS["table"], id="rank-table")


def diagnosis_lines(view: StoreView, *, use_summary: bool) -> tuple[list[FindingLine], tuple[str, ...], str]:
    """``(findings, missing signals, where they come from)``: the primary diagnosis first.

    A finished recording carries the diagnosis of its whole run in the ``summary`` attachment, so
    replay shows that one (no need to diagnose millions of rows again); otherwise (live, crashed
    file) the view is diagnosed here.
    """
    if use_summary:
        recorded = findings_from_summary(view.attachments.get("summary"))
        if recorded:
            return recorded, (), "the run's summary, written when it ended"
    try:
        from traceml.diagnosis import diagnose
    except ImportError:
        return [], (), "diagnosis is not available in this installation"
    try:
        result = diagnose(view)
    except Exception as exc:  # a diagnosis bug must not take the dashboard down
        log.warning("diagnosis failed: %s", exc, exc_info=True)
        return [], (), f"diagnosis failed: {exc}"
    lines = findings_from_summary(result.to_dict())
    return lines, tuple(getattr(result, "missing", ())), "diagnosed from the rows shown"


def diagnosis_children(view: StoreView, *, use_summary: bool = False) -> list[Any]:
    lines, missing, source = diagnosis_lines(view, use_summary=use_summary)
    children: list[Any] = [html.H4("Diagnosis")]
    if not lines:
        return [*children, html.P(source, style={"color": GREY})]
    primary = lines[0]
    rank = "" if primary.rank is None else f" (rank {primary.rank})"
    children.append(html.P([html.B(primary.kind, id="diagnosis-primary"), html.Span(f"{rank} — {primary.text}")]))
    items = []
    for f in lines:
        colour = _SEVERITY_COLOUR.get(f.severity, "#2563eb")
        where = "" if f.rank is None else f" (rank {f.rank})"
        items.append(
            html.Li(
                [
                    html.B(f"{f.kind}{where}", style={"color": colour}),
                    html.Span(f" [{f.severity}] "),
                    html.Span(f.text),
                ],
                className=f"finding finding-{f.severity}",
            )
        )
    children.append(html.Ul(items))
    if missing:
        children.append(html.P(f"not recorded, so some rules did not run: {', '.join(missing)}", style={"color": GREY}))
    children.append(html.P(f"source: {source}", style={"color": GREY, "fontSize": "12px"}))
    children += residual_children(view, use_summary=use_summary)
    return children


def now_children(view: StoreView) -> list[Any]:
    """Live: the verdict over the last seconds of steps (traceml.diagnosis.live), above the run's."""
    try:
        from traceml.diagnosis.live import live_verdict

        f = live_verdict(view)
    except Exception as exc:  # a diagnosis bug must not take the dashboard down
        log.warning("live verdict failed: %s", exc, exc_info=True)
        return []
    if f is None:
        return []
    colour = _SEVERITY_COLOUR.get(f.severity, "#2563eb")
    return [
        html.H4("Now (the last seconds of steps)"),
        html.P(
            [html.B(f.kind, id="diagnosis-now", style={"color": colour}), html.Span(f" [{f.severity}] {f.summary}")]
        ),
    ]


def residual_children(view: StoreView, *, use_summary: bool) -> list[Any]:
    """The stack sampler's top functions of the residual, as a table (nothing without samples)."""
    residual: Any = None
    summary = view.attachments.get("summary") if use_summary else None
    if isinstance(summary, dict):
        residual = summary.get("residual")
    if residual is None:
        try:
            from traceml.diagnosis.stacks import residual_profile
            from traceml.views.steps import step_data

            profile = residual_profile(view, step_data(view))
            residual = profile.to_dict() if profile is not None else None
        except Exception as exc:  # a diagnosis bug must not take the dashboard down
            log.warning("residual profile failed: %s", exc, exc_info=True)
            return []
    if not isinstance(residual, dict) or not residual.get("top"):
        return []
    head = html.Tr([html.Th(h) for h in ("residual spent in", "defined at", "samples", "share", "reads data")])
    body = [
        html.Tr(
            [
                html.Td(str(e.get("func", ""))[:96]),
                html.Td(str(e.get("site", ""))[:96]),
                html.Td(str(e.get("samples", ""))),
                html.Td(f"{100 * float(e.get('share') or 0):.0f}%"),
                html.Td("yes" if e.get("reads_data") else ""),
            ]
        )
        for e in list(residual["top"])[:8]
        if isinstance(e, dict)
    ]
    return [
        html.H4("Where the residual goes (stack samples)"),
        html.Table([html.Thead(head), html.Tbody(body)], style=CSS["table"], id="residual-table"),
    ]


def stats_children(
    bd: views.StepBreakdown, rs: views.RankSteps, compare: views.StepBreakdown | None, labels: tuple[str, str]
) -> list[Any]:
    """The statistics line above the charts (ids ``stat-*``)."""

    def ms(v: float) -> str:
        if not math.isfinite(v):
            return "n/a" if bd.exact else "loading…"
        return f"{v:.3f} ms"

    skew = "n/a" if not math.isfinite(rs.skew_pct) else f"{rs.skew_pct:.1f}%"
    if not rs.exact and math.isfinite(rs.skew_pct):
        skew += " (of means, while loading)"
    tput = f"{bd.steps_per_s:.2f}" if math.isfinite(bd.steps_per_s) else ("n/a" if bd.exact else "loading…")
    outside = f"{100 * bd.outside_share:.1f}%" if math.isfinite(bd.outside_share) else "n/a"
    parts = [
        ("median step (job)", ms(bd.median_ms), "stat-median"),
        ("p95 step", ms(bd.p95_ms), "stat-p95"),
        ("skew (steps all ranks have)", skew, "stat-skew"),
        ("slowest rank", "-" if rs.slowest_rank is None else str(rs.slowest_rank), "stat-slowest"),
        ("steps/s (measured)", tput, "stat-throughput"),
        ("outside steps", outside, "stat-outside"),
        ("rows", f"{bd.rows:,} steps x ranks over {len(bd.ranks)} rank(s)", "stat-rows"),
    ]
    if compare is not None:
        parts.append((f"{labels[1]} median step", ms(compare.median_ms), "stat-compare-median"))
    return [
        html.Span([html.Span(f"{k}: ", style={"color": GREY}), html.B(v, id=i)], style={"marginRight": "18px"})
        for k, v, i in parts
    ]


def run_panels(info: views.RunInfo, other: views.RunInfo | None, other_label: str) -> tuple[list[Any], list[Any]]:
    """The run panel (meta, ranks, environment) and the integrity panel; ``other``: the compared run."""
    meta: list[Any] = [html.H4("Run"), kv_table(info.meta, "run-meta"), html.H4("Ranks"), rank_table(info.ranks)]
    if info.environment:
        meta += [html.H4("Environment"), kv_table(info.environment, "run-environment")]
    else:
        meta += [html.H4("Environment"), html.P("not recorded", style={"color": GREY})]
    integ: list[Any] = [html.H4("Recording integrity"), kv_table(info.integrity, "integrity-table")]
    if other is not None:
        meta += [html.H4(f"Compared with: {other_label}"), kv_table(other.meta, "compare-meta")]
        integ += [html.H4(f"{other_label} integrity"), kv_table(other.integrity)]
    return meta, integ


def notice(title: str, text: str) -> list[Any]:
    """A panel that says what it waits for."""
    return [html.H4(title), html.P(text, style={"color": GREY})]
