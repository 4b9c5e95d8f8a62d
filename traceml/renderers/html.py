"""Pure HTML building blocks shared by the report and compare pages: the stylesheet, escaped text,
tables, Plotly chart blocks and the page shell.  Everything read from a recording passes
:func:`text` (:mod:`traceml.escape`) before it becomes markup; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from traceml import escape as esc

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#111827;background:#f9fafb}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.sub{color:#6b7280;font-size:13px}
.verdict{border-left:6px solid;padding:12px 16px;background:#fff;margin:16px 0;border-radius:4px}
.verdict b{font-size:16px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0}
td,th{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev{font-weight:600;text-transform:uppercase;font-size:11px}
.chart{background:#fff;margin:8px 0;border:1px solid #e5e7eb}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px} .grid>div{min-width:0}
"""

#: colour of a finding's severity (and of a compare verdict of the same weight)
SEVERITY_COLOR = {"critical": "#b91c1c", "warn": "#b45309", "info": "#1d4ed8"}


def text(x: Any) -> str:
    """Text for the page: entities, and control characters as visible escapes (:mod:`traceml.escape`)."""
    return esc.html("" if x is None else x, None)


def num(x: Any, fmt: str = "{:.2f}") -> str:
    """A number formatted with *fmt*, or ``—`` when absent."""
    return "—" if x is None else fmt.format(x)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 99) -> str:
    """A table; the header is escaped here, the cells are markup the caller escaped already."""
    head = "".join(f"<th>{text(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i >= numeric_from else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def key_values(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column table of escaped keys and values."""
    return table(["", ""], [[text(k), text(v)] for k, v in rows])


def chart(name: str, fig: go.Figure) -> str:
    """A Plotly figure as a ``<div class=chart>`` (plotly.js is loaded once by the page)."""
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{name}", config={"displaylogo": False})
    return f"<div class=chart>{div}</div>"


def plotly_inline() -> str:
    """plotly.js in the page itself (the page works offline and alone)."""
    return f'<script type="text/javascript">{get_plotlyjs()}</script>'


def plotly_src(src: str) -> str:
    """plotly.js loaded from *src* (a file beside the page or a URL), escaped as an attribute."""
    return f'<script src="{text(src)}" charset="utf-8"></script>'


def page(title: str, parts: Sequence[str], plotly_script: str) -> str:
    """The whole document: *title* (escaped here), the stylesheet, *plotly_script*, then *parts*."""
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{text(title)}</title>"
        f"<style>{CSS}</style>" + plotly_script + f"</head><body><main>{''.join(parts)}</main></body></html>\n"
    )
