"""CI artifacts from a recording alone: ``report.html``, ``summary.json`` and ``summary.md``.

:func:`build_report` is pure; the HTML is self-contained (opens offline).  No torch on this path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from traceml import escape as esc
from traceml import views
from traceml.diagnosis import build_summary, traceml_cost_text
from traceml.diagnosis import thresholds as th
from traceml.errors import ReportError, TracemlError
from traceml.outpaths import OutputDir
from traceml.renderers import figures as fg
from traceml.renderers import html
from traceml.store import StoreView
from traceml.units import fmt_bytes

REPORT_HTML = "report.html"
#: ``--plotly-js``: inline (one self-contained file, the default) or directory (plotly.min.js beside it);
#: like plotly's own ``include_plotlyjs``, any other value ending in ``.js`` is a script src that
#: report.html references as given and traceml does not write (one copy shared by many reports)
PLOTLY_JS_CHOICES = ("inline", "directory")
PLOTLY_JS_SRC_MAX = 200


def check_plotly_js(value: str) -> str:
    """``value`` if it is a ``--plotly-js`` choice or a script src ending in ``.js``; else a ReportError."""
    if value in PLOTLY_JS_CHOICES:
        return value
    if value.endswith(".js") and 0 < len(value) <= PLOTLY_JS_SRC_MAX and value.isprintable():
        return value
    raise ReportError(
        f"--plotly-js {value!r}: expected inline, directory, or a script src ending in .js"
        f" (at most {PLOTLY_JS_SRC_MAX} printable characters, e.g. ../plotly.min.js shared by several reports)"
    )


PLOTLY_JS_FILE = "plotly.min.js"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


@dataclass(frozen=True)
class Report:
    summary: dict[str, Any]
    html: str
    markdown: str
    #: "inline": plotly.js inside report.html; "directory": beside it as plotly.min.js
    plotly_js: str = "inline"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    summary_json: Path
    summary_md: Path
    #: ``--plotly-js directory``: the plotly.min.js report.html loads
    plotly_js: Path | None = None


# --- embedded summary ----------------------------------------------------------------------------


def _finding_keys(diag: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    return sorted((str(f.get("kind")), f.get("rank"), str(f.get("severity"))) for f in diag.get("findings", []))


def check_embedded(embedded: Any, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Compare the summary embedded at the end of the run with the one recomputed from the data.

    Only data-derived facts are compared (step counts, the verdicts); the integrity block differs
    by design (the embedded one was built from the live store).
    """
    if not isinstance(embedded, Mapping):
        return {"present": False, "consistent": None, "differences": []}
    diffs: list[str] = []

    def cmp(label: str, a: Any, b: Any) -> None:
        if a != b:
            diffs.append(f"{label}: embedded {a!r}, recomputed {b!r}")

    cmp("schema_version", embedded.get("schema_version"), summary.get("schema_version"))
    e_steps, r_steps = embedded.get("steps") or {}, summary.get("steps") or {}
    for key in ("count", "first", "last", "failed_rows"):
        cmp(f"steps.{key}", e_steps.get(key), r_steps.get(key))
    e_diag, r_diag = embedded.get("diagnosis") or {}, summary.get("diagnosis") or {}
    e_p, r_p = e_diag.get("primary") or {}, r_diag.get("primary") or {}
    for key in ("kind", "severity", "rank"):
        cmp(f"diagnosis.primary.{key}", e_p.get(key), r_p.get(key))
    cmp("diagnosis.findings", _finding_keys(e_diag), _finding_keys(r_diag))
    return {"present": True, "consistent": not diffs, "differences": diffs}


# --- figures (pure) -------------------------------------------------------------------------------


def figures(view: StoreView) -> list[tuple[str, go.Figure]]:
    """The report's charts, drawn by the same renderers as the live and replay dashboards."""
    ranks = views.rank_steps(view)
    system = views.system_series(view)
    charts = [
        ("steps", fg.step_breakdown_figure(views.step_breakdown(view))),
        ("ranks", fg.rank_steps_figure(ranks)),
    ]
    if len(ranks.stats) > 1:
        charts.append(("heatmap", fg.rank_heatmap_figure(ranks)))
    charts += [
        ("throughput", fg.throughput_figure(views.throughput(view))),
        ("memory", fg.memory_figure(views.memory_series(view))),
        ("system", fg.system_figure(system)),
    ]
    if system.gpu_recorded:
        charts.append(("gpus", fg.gpu_figure(system)))
    return charts


# --- documents ------------------------------------------------------------------------------------


def _findings_table(diag: Mapping[str, Any]) -> str:
    rows = []
    for f in diag.get("findings", []):
        color = html.SEVERITY_COLOR.get(f["severity"], "#374151")
        rows.append(
            [
                f"<span class=sev style='color:{color}'>{html.text(f['severity'])}</span>",
                html.text(f["kind"]),
                html.text("" if f.get("rank") is None else f["rank"]),
                html.text(f["summary"]),
            ]
        )
    return html.table(["severity", "finding", "rank", "what and how much"], rows)


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _step_facts(steps: Mapping[str, Any]) -> list[str]:
    """The run-level figures, each with its definition (docs/diagnosis.md, "One answer per question")."""
    facts = []
    if steps.get("throughput_steps_per_s"):
        facts.append(f"{steps['throughput_steps_per_s']:.2f} steps/s measured (steps over the wall time they took)")
    if steps.get("outside_step_share") is not None:
        facts.append(f"{_pct(steps['outside_step_share'])} of wall time outside any step")
    if steps.get("rank_skew_pct") is not None:
        facts.append(
            f"rank skew {steps['rank_skew_pct']:.1f}% (slowest rank {steps['slowest_rank']}, "
            f"on the {steps['common_steps']} steps every rank has)"
        )
    return facts


def _regions_table(regions: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for r in regions[:64]:
        if r.get("where") == "between steps":
            rows.append(
                [
                    html.text(r["name"]),
                    "between steps",
                    html.text(r["calls"]),
                    "—",
                    "—",
                    "—",
                    _pct(r.get("wall_share")) + " of wall time",
                ]
            )
        else:
            rows.append(
                [
                    html.text(r["name"]),
                    "in steps",
                    html.text(r["calls"]),
                    html.num(r.get("median_ms")),
                    html.num(r.get("mean_ms")),
                    _pct(r.get("share")),
                    _pct(r.get("outside_phases_share")),
                ]
            )
    header = ["region", "where", "calls", "median ms", "mean ms", "share of step time", "outside the phases"]
    return html.table(header, rows, numeric_from=2)


def _residual_table(residual: Mapping[str, Any]) -> str:
    """The stack sampler's top functions of the residual (names from the file: escaped)."""
    rows = [
        [
            html.text(e.get("func", "")),
            html.text(e.get("site", "")),
            html.text(e.get("samples", "")),
            _pct(e.get("share")),
            "yes" if e.get("reads_data") else "",
        ]
        for e in list(residual.get("top", []))[:16]
    ]
    table = html.table(["function", "defined at", "samples", "of residual samples", "reads data"], rows, numeric_from=2)
    note = (
        f"<div class=sub>{html.text(residual.get('samples'))} samples taken while no named phase ran; "
        f"{_pct(residual.get('input_share'))} of them reading data</div>"
    )
    return table + note


def _phase_table(steps: Mapping[str, Any]) -> str:
    overall = steps.get("overall", {})
    header = ["phase", "job median ms", "job p95 ms", "mean ms", "share"]
    per_rank = steps.get("per_rank", [])
    header += [f"rank {r['rank']} median / p95" for r in per_rank[:16]]
    rows = []
    for p in overall:
        row = [
            html.text(p),
            html.num(overall[p]["median_ms"]),
            html.num(overall[p]["p95_ms"]),
            html.num(overall[p].get("mean_ms")),
            _pct(overall[p].get("share")) if p != "step" else "",
        ]
        for r in per_rank[:16]:
            s = r["phases"].get(p, {})
            row.append(f"{html.num(s.get('median_ms'))} / {html.num(s.get('p95_ms'))}")
        rows.append(row)
    return html.table(header, rows, numeric_from=1)


def _environment(view: StoreView) -> list[tuple[str, Any]]:
    env = view.attachments.get("environment/rank0")
    if not isinstance(env, Mapping):
        return []
    out: list[tuple[str, Any]] = []
    for k in sorted(env)[:30]:
        v = env[k]
        out.append((str(k), v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)[:200]))
    return out


def render_html(
    view: StoreView,
    summary: Mapping[str, Any],
    embedded: Mapping[str, Any],
    source: str = "",
    plotly_js: str = "inline",
) -> str:
    run, steps, diag = summary["run"], summary["steps"], summary["diagnosis"]
    recent = summary["diagnosis_recent"]
    primary = diag["primary"]
    color = html.SEVERITY_COLOR.get(primary["severity"], "#374151")
    title = run["name"] or run["id"] or (Path(source).name if source else "run")
    parts = [
        f"<h1>traceml report — {html.text(title)}</h1>",
        f"<div class=sub>{html.text(source)} · run {html.text(run['id'])} · started {html.text(run['start'])} · "
        f"{html.text(run['world_size'])} rank(s) · exit {html.text(run['exit_status'])}</div>",
        f"<div class=verdict style='border-color:{color}'><b style='color:{color}'>{html.text(primary['kind'])}</b> "
        f"<span class=sev style='color:{color}'>{html.text(primary['severity'])}</span><br>{html.text(primary['summary'])}</div>",
        "<h2>Diagnosis — whole run</h2>",
        _findings_table(diag),
        f"<div class=sub>window: steps {html.text(diag['window']['first_step'])}–{html.text(diag['window']['last_step'])} "
        f"({diag['window']['steps']} analysed; {diag['window']['warmup_steps']} warm-up and "
        f"{diag['window']['failed_rows']} failed rows skipped)</div>",
        f"<h2>Diagnosis — last {html.text(recent['window']['last_n'])} steps</h2>",
        _findings_table(recent),
    ]
    if diag.get("missing"):
        parts.append("<div class=sub>not checked: " + html.text("; ".join(diag["missing"])) + "</div>")
    parts += [
        "<h2>Step time</h2>",
        f"<div class=sub>{steps['count']} steps analysed (of {steps['recorded_rows']} rows recorded)"
        + "".join(f" · {html.text(f)}" for f in _step_facts(steps))
        + "</div>",
        _phase_table(steps),
        "<div class=sub>job median: per step, the slowest rank's step time and the ranks' mean phase time; "
        "share: the phase's time summed over the steps and ranks over the step time summed the same way "
        "(shown beside the mean)</div>",
    ]
    cost = traceml_cost_text(summary)
    if cost:
        parts.append(f"<div class=sub>{html.text(cost)}</div>")
    if summary.get("regions"):
        parts += ["<h2>Named regions (traceml.trace_time)</h2>", _regions_table(summary["regions"])]
    if summary.get("residual"):
        parts += ["<h2>Where the residual goes (stack samples)</h2>", _residual_table(summary["residual"])]
    charts = figures(view)
    for i, (name, fig) in enumerate(charts):
        if i % 2 == 0:
            parts.append("<div class=grid>")
        parts.append(html.chart(name, fig))
        if i % 2 == 1 or i == len(charts) - 1:
            parts.append("</div>")
    mem = summary["memory"]
    parts += [
        "<h2>Memory</h2>",
        html.table(
            ["rank", "peak RSS", "peak GPU allocated", "peak GPU reserved", "GPU total"],
            [
                [
                    r["rank"],
                    *(
                        fmt_bytes(r[k]) if r[k] is not None else "—"
                        for k in (
                            "peak_rss_bytes",
                            "peak_gpu_alloc_bytes",
                            "peak_gpu_reserved_bytes",
                            "gpu_total_bytes",
                        )
                    ),
                ]
                for r in mem["per_rank"]
            ],
            numeric_from=1,
        ),
    ]
    gpus = summary["system"]["gpus"]
    if gpus:
        parts += [
            "<h2>GPUs</h2>",
            html.table(
                ["node", "gpu", "samples", "util mean %", "util p95 %", "max memory used", "max temp °C"],
                [
                    [
                        g["node_rank"],
                        g["gpu_idx"],
                        g["samples"],
                        html.num(g["util_pct_mean"], "{:.0f}"),
                        html.num(g["util_pct_p95"], "{:.0f}"),
                        fmt_bytes(g["mem_used_max_bytes"]) if g["mem_used_max_bytes"] is not None else "—",
                        html.num(g["temp_c_max"], "{:.0f}"),
                    ]
                    for g in gpus
                ],
                numeric_from=2,
            ),
        ]
    integ = summary["integrity"]
    lost = integ["lost"]
    emb = (
        "none in the file"
        if not embedded["present"]
        else "consistent with the data"
        if embedded["consistent"]
        else "differs: " + "; ".join(embedded["differences"])
    )
    parts += [
        "<h2>Run</h2>",
        html.key_values(
            [
                ("run id", run["id"]),
                ("name", run["name"]),
                ("start (UTC)", run["start"]),
                ("duration", html.num(run["duration_s"], "{:.1f} s")),
                ("world size", run["world_size"]),
                ("hosts", ", ".join(run["hosts"])),
                ("exit status", f"{run['exit_status']} (code {run['exit_code']})"),
                *[
                    (
                        f"rank {r['rank']}",
                        f"{r['host']} node {r['node_rank']} · {r['state']} · {r['exit_status'] or '-'}",
                    )
                    for r in run["ranks"][:64]
                ],
            ]
        ),
    ]
    env = _environment(view)
    if env:
        parts += ["<h2>Environment (rank 0)</h2>", html.key_values(env)]
    parts += [
        "<h2>Integrity</h2>",
        html.key_values(
            [
                ("status", integ["status"]),
                ("complete", integ["complete"]),
                ("message", integ["message"]),
                ("bytes skipped", lost["bytes"]),
                ("records skipped", lost["skipped_records"]),
                ("rows dropped by ranks", f"{lost['rows_dropped']} {lost['rows_dropped_by_table'] or ''}"),
                ("rows evicted (live window)", lost["rows_evicted"]),
                ("ranks that died", ", ".join(map(str, lost["ranks_died"])) or "none"),
                ("failed steps (excluded)", lost["failed_step_rows"]),
                ("embedded summary", emb),
            ]
        ),
        f"<p class=sub>Generated by traceml report from the recording alone. Thresholds: docs/diagnosis.md "
        f"(warm-up {th.WARMUP_STEPS} steps, at least {th.MIN_STEPS} steps per rank).</p>",
    ]
    if plotly_js == "inline":
        script = html.plotly_inline()
    else:
        script = html.plotly_src(PLOTLY_JS_FILE if plotly_js == "directory" else plotly_js)
    return html.page(f"traceml report — {title}", parts, script)


def _md_name(name: Any) -> str:
    """A region name from the recording, inert in a Markdown table cell."""
    return esc.markdown(name, 80)


def render_markdown(summary: Mapping[str, Any], embedded: Mapping[str, Any] | None = None) -> str:
    """A short summary for ``$GITHUB_STEP_SUMMARY``: the verdict first, then the numbers."""
    run, steps, diag = summary["run"], summary["steps"], summary["diagnosis"]
    p = diag["primary"]
    name = esc.markdown(run["name"] or run["id"] or "run")  # names and texts from the file: escaped
    icon = {"critical": "🔴", "warn": "🟠", "info": "🟢"}.get(p["severity"], "")
    lines = [
        f"## traceml: {name} — {icon} {p['kind']} ({p['severity']})",
        "",
        f"> {esc.markdown(p['summary'], 2000)}",
        "",
    ]
    step = steps["overall"]["step"]
    facts = [
        f"**{steps['count']}** steps analysed",
        f"**{run['world_size']}** rank(s)",
        f"exit **{esc.markdown(run['exit_status'])}**",
    ]
    if step["median_ms"] is not None:
        facts.insert(1, f"median step **{step['median_ms']:.2f} ms** (p95 {step['p95_ms']:.2f} ms)")
    if steps.get("throughput_steps_per_s"):
        facts.append(f"{steps['throughput_steps_per_s']:.2f} steps/s measured")
    if steps.get("outside_step_share") is not None:
        facts.append(f"{100 * steps['outside_step_share']:.1f}% of wall time outside any step")
    if steps.get("rank_skew_pct") is not None:
        facts.append(f"rank skew {steps['rank_skew_pct']:.1f}% (slowest rank {steps['slowest_rank']})")
    cost = traceml_cost_text(summary)
    if cost:
        facts.append(cost)
    lines += [" · ".join(facts), ""]
    key = (p["kind"], p["rank"], p["summary"])
    others = [f for f in diag["findings"] if (f["kind"], f["rank"], f["summary"]) != key]
    if others:
        lines.append("| severity | finding | rank | detail |")
        lines.append("|---|---|---|---|")
        for f in others:
            detail = esc.markdown(f["summary"], 2000)
            lines.append(f"| {f['severity']} | {f['kind']} | {'' if f['rank'] is None else f['rank']} | {detail} |")
        lines.append("")
    recent = summary["diagnosis_recent"]["primary"]
    lines.append(
        f"Last {summary['diagnosis_recent']['window']['last_n']} steps: **{recent['kind']}** ({recent['severity']})."
    )
    lines.append("")
    overall = steps["overall"]
    measured = [ph for ph in overall if overall[ph]["median_ms"] is not None]
    if measured:
        lines.append("| phase | job median ms | p95 ms | share of step time |")
        lines.append("|---|---:|---:|---:|")
        for ph in measured:
            share = overall[ph].get("share")
            cell = "" if share is None else f"{100 * share:.1f}%"
            lines.append(
                f"| {esc.markdown(ph)} | {overall[ph]['median_ms']:.2f} | {overall[ph]['p95_ms']:.2f} | {cell} |"
            )
        lines.append("")
    named = [r for r in summary.get("regions", []) if r.get("share") is not None or r.get("wall_share") is not None]
    if named:
        lines.append("| named region | where | share |")
        lines.append("|---|---|---:|")
        for r in named[:32]:
            where = str(r.get("where", ""))
            share = r.get("share") if where == "in steps" else r.get("wall_share")
            what = "of step time" if where == "in steps" else "of wall time"
            lines.append(f"| {_md_name(r['name'])} | {where} | {100 * (share or 0):.1f}% {what} |")
        lines.append("")
    residual = summary.get("residual")
    if residual and residual.get("top"):
        lines.append("| residual spent in | defined at | of residual samples | reads data |")
        lines.append("|---|---|---:|---|")
        for e in list(residual["top"])[:8]:
            share = 100 * float(e.get("share") or 0)
            reads = "yes" if e.get("reads_data") else ""
            lines.append(f"| {_md_name(e.get('func', ''))} | {_md_name(e.get('site', ''))} | {share:.0f}% | {reads} |")
        lines.append("")
    mem = summary["memory"]
    peaks = [
        f"{label} {fmt_bytes(mem[k])}"
        for k, label in (("peak_rss_bytes", "RSS"), ("peak_gpu_alloc_bytes", "GPU allocated"))
        if mem.get(k) is not None
    ]
    if peaks:
        lines.append("Peak memory: " + ", ".join(peaks) + ".")
    integ = summary["integrity"]
    lost = integ["lost"]
    if integ["complete"]:
        lines.append(f"Recording: {integ['status']}, nothing lost.")
    else:
        lines.append(
            f"Recording: **{integ['status']}**; {lost['bytes']} bytes and {lost['skipped_records']} records skipped, "
            f"{lost['rows_dropped']} rows dropped, {lost['rows_evicted']} evicted."
        )
    if embedded and embedded.get("present") and not embedded.get("consistent"):
        lines.append(
            "Embedded summary differs from the data: "
            + "; ".join(esc.markdown(d, 500) for d in embedded["differences"])
        )
    return "\n".join(lines) + "\n"


def build_report(
    view: StoreView, *, source: str = "", recent_steps: int = th.RECENT_STEPS, plotly_js: str = "inline"
) -> Report:
    """The three documents for ``view`` (pure; no file is touched)."""
    check_plotly_js(plotly_js)
    summary = build_summary(view, recent_steps=recent_steps)
    embedded = check_embedded(view.attachments.get("summary"), summary)
    doc = dict(summary)
    doc["embedded_summary"] = embedded
    return Report(
        summary=doc,
        html=render_html(view, summary, embedded, source, plotly_js),
        markdown=render_markdown(summary, embedded),
        plotly_js=plotly_js,
    )


# --- files ------------------------------------------------------------------------------------------


def load_view(path: str | Path) -> StoreView:
    """Open a recording with the replay engine and return its whole-run view, in bounded memory
    (every row when they fit the row budget, else totals, sketches and a sample: replay/bounded.py)."""
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"recording {str(p)!r} not found; expected a .tml file written by `traceml run`")
    import replay

    try:
        with replay.open(p) as rec:
            return rec.bounded_view()
    except TracemlError:
        raise
    except OSError as exc:
        raise ReportError(f"cannot read recording {str(p)!r}: {exc}") from exc


def write_documents(report: Report, out_dir: str | Path, *, overwrite: bool = False) -> ReportFiles:
    """Write the three documents into ``out_dir``; existing ones are refused unless ``overwrite``."""
    out = OutputDir(out_dir, overwrite=overwrite, option="--out")
    files = ReportFiles(out.claim(REPORT_HTML), out.claim(SUMMARY_JSON), out.claim(SUMMARY_MD))
    paths = (files.html, files.summary_json, files.summary_md)
    try:
        out.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(
            f"cannot write the report into {str(out.root)!r}: {exc}; choose another --out directory"
        ) from exc
    out.check(paths)
    texts = (report.html, json.dumps(report.summary, indent=2, allow_nan=False) + "\n", report.markdown)
    try:
        out.write_texts(paths, texts)
    except OSError as exc:
        raise ReportError(
            f"cannot write the report into {str(out.root)!r}: {exc}; choose another --out directory"
        ) from exc
    if report.plotly_js == "directory":
        files = dataclasses.replace(files, plotly_js=_write_plotly_js(out.root))
    return files


def _write_plotly_js(directory: Path) -> Path:
    """plotly.min.js beside report.html: written once, kept when an identical copy is there."""
    target = directory / PLOTLY_JS_FILE
    code = get_plotlyjs().encode("utf-8")
    try:
        if target.is_symlink():
            raise ReportError(f"{target} is a symbolic link; traceml does not write through links: remove it")
        if target.is_file() and target.stat().st_size == len(code) and target.read_bytes() == code:
            return target
        tmp = target.with_name(f".{PLOTLY_JS_FILE}.{os.getpid()}.tmp")
        tmp.write_bytes(code)
        os.replace(tmp, target)  # the same library file: replacing an older copy loses nothing
    except OSError as exc:
        raise ReportError(f"cannot write {target}: {exc}; choose another --out directory") from exc
    return target


def write_report(
    recording: str | Path,
    out_dir: str | Path,
    *,
    recent_steps: int = th.RECENT_STEPS,
    overwrite: bool = False,
    plotly_js: str = "inline",
) -> ReportFiles:
    """``traceml report``: read ``recording`` and write report.html, summary.json, summary.md."""
    OutputDir(out_dir, overwrite=overwrite).check(
        Path(out_dir) / name for name in (REPORT_HTML, SUMMARY_JSON, SUMMARY_MD)
    )
    view = load_view(recording)
    return write_documents(
        build_report(view, source=str(recording), recent_steps=recent_steps, plotly_js=plotly_js),
        out_dir,
        overwrite=overwrite,
    )
