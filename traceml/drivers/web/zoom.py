"""What the user chose to see, from browser events to query parameters (pure, tested directly):
the step range a zoom or brush on a step axis sets, and the ranks the rank filter keeps."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import dash

from traceml.drivers.web.layout import STEP_AXIS_FIGURES
from traceml.errors import ConfigError
from traceml.views.spread import parse_rank_filter


def parse_step_range(relayout: Mapping[str, Any] | None) -> tuple[int, int] | None | bool:
    """A relayout event on a step axis -> ``(lo, hi)`` steps, ``None`` (full range), or False (not about x).

    Plotly sends ``{"xaxis.range[0]": a, "xaxis.range[1]": b}`` for a zoom or brush,
    ``{"xaxis.range": [a, b]}`` from ``Plotly.relayout``, ``{"xaxis.autorange": true}`` on
    double-click, and unrelated keys (``autosize``, ``yaxis.*``, ``dragmode``) otherwise.
    """
    if not relayout:
        return False
    if relayout.get("xaxis.autorange"):
        return None
    rng = relayout.get("xaxis.range")
    if isinstance(rng, (list, tuple)) and len(rng) == 2:
        a, b = rng
    elif "xaxis.range[0]" in relayout and "xaxis.range[1]" in relayout:
        a, b = relayout["xaxis.range[0]"], relayout["xaxis.range[1]"]
    else:
        return False
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(fa) and math.isfinite(fb)):
        return False
    lo, hi = math.ceil(min(fa, fb)), math.floor(max(fa, fb))
    if hi < lo:  # a zoom narrower than one step: keep the step under it
        lo = hi = round((fa + fb) / 2)
    return (lo, hi)


def step_range_update(relayouts: Sequence[Mapping[str, Any] | None], current: Any) -> Any:
    """The new step range from the relayout events that came in together, or ``dash.no_update``.

    Plotly reports a redraw of any chart as a relayout too (``{"autosize": true}``): when one comes
    in with the user's zoom on another chart, the zoom must win, so every event is looked at."""
    for relayout in relayouts:
        parsed = parse_step_range(relayout)
        if parsed is False:
            continue
        new = list(parsed) if isinstance(parsed, tuple) else None
        return dash.no_update if new == current else new
    return dash.no_update


#: Runs in the browser on every relayout of a step chart and keeps only those about the x axis (a
#: zoom, a brush, a double-click) in the ``step-zoom`` store, numbered so a repeated zoom is new
#: again.  Plotly reports other changes as relayouts too (``{"autosize": true}`` when a chart is
#: first drawn or resized); were they sent to the server with the zoom's, a later one would
#: replace a zoom still being parsed there (Dash drops the answer to a request a newer one
#: replaced) and the zoom would be lost.  Which events are about x is decided here (a superset);
#: what they mean, by :func:`parse_step_range` on the server.
KEEP_X_RELAYOUTS_JS = """function() {
    const args = Array.from(arguments), previous = args.pop();
    const about_x = r => !!r && (Boolean(r['xaxis.autorange']) || 'xaxis.range' in r || 'xaxis.range[0]' in r);
    const fired = dash_clientside.callback_context.triggered.map(t => t.prop_id.split('.')[0]);
    const kept = args.filter((r, i) => fired.includes(STEP_AXIS_FIGURES[i]) && about_x(r));
    if (!kept.length) return dash_clientside.no_update;
    return {relayouts: kept, seq: (previous && previous.seq || 0) + 1};
}"""


def zoom_js() -> str:
    """:data:`KEEP_X_RELAYOUTS_JS` with the step charts' ids filled in (inputs in STEP_AXIS_FIGURES order)."""
    ids = "[" + ", ".join(f"'{f}'" for f in STEP_AXIS_FIGURES) + "]"
    return KEEP_X_RELAYOUTS_JS.replace("STEP_AXIS_FIGURES", ids)


def range_event_update(triggered: Collection[str], zoom: Any, current: Any) -> Any:
    """The step range after the events ``triggered`` (component ids): the reset button clears it,
    otherwise the x-axis relayouts kept in the ``step-zoom`` store (``zoom``) set it."""
    if "range-reset" in triggered:
        return None if current is not None else dash.no_update
    relayouts = zoom.get("relayouts") if isinstance(zoom, dict) else None
    if "step-zoom" not in triggered or not isinstance(relayouts, list):
        return dash.no_update
    return step_range_update([r for r in relayouts if isinstance(r, dict)], current)


def as_range(data: Any) -> tuple[int, int] | None:
    """The step range held in the page (``[lo, hi]`` or null) as the views take it."""
    if isinstance(data, (list, tuple)) and len(data) == 2:
        return (int(data[0]), int(data[1]))
    return None


def uirevision(rng: tuple[int, int] | None) -> str:
    """Plotly keeps the user's zoom and legend clicks while ``uirevision`` stays the same: the same
    range refreshed (live) keeps them; a new range (or the full one) shows its data from scratch."""
    return "all" if rng is None else f"{rng[0]}-{rng[1]}"


def rank_spec_update(spec: Any, available: Sequence[int]) -> tuple[Any, str]:
    """The rank filter's new value for the text typed in the wide-run rank box, and the inline message.
    Empty text: every rank.  Text that does not parse, or names no rank of this run: the value is
    left as it was (``dash.no_update``) and the message says what was expected."""
    text = str(spec or "").strip()[:1000]
    if not text:
        return list(available), f"all {len(available):,} ranks"
    try:
        wanted = parse_rank_filter(text)
    except ConfigError as exc:
        return dash.no_update, str(exc)
    chosen = [r for r in available if r in wanted]
    if not chosen:
        last = max(available) if available else -1
        return (
            dash.no_update,
            f"rank filter {text!r} names no rank of this run (ranks 0-{last}); expected e.g. 0-15,300",
        )
    return chosen, f"{len(chosen):,} of {len(available):,} ranks"


def ranks_arg(value: Any, available: Sequence[int]) -> tuple[int, ...]:
    """The rank filter's value as the views take it (None: every rank available)."""
    if value is None:
        return tuple(available)
    return tuple(sorted(int(v) for v in value))
