"""The versioned run summary: ``build_summary(view) -> dict`` (schema in docs/summary.schema.json).

Pure and deterministic: a summary recomputed from the file matches the embedded one.  JSON/msgpack types only.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.engine import diagnose, diagnose_steps
from traceml.diagnosis.findings import clean_number
from traceml.diagnosis.stacks import residual_profile
from traceml.diagnosis.steps import StepData, job_series, step_data
from traceml.schema import PHASES
from traceml.store import StoreView
from traceml.units import fmt_bytes
from traceml.views.final import traceml_cost_text
from traceml.views.measures import JobMeasures, job_measures, run_duration_s, run_start_ns
from traceml.views.sketch import QuantileSketch

SCHEMA_VERSION = 1
#: the phases summarised, in display order ("step" is the whole step)
SUMMARY_PHASES: tuple[str, ...] = ("step", *PHASES)


def stats_ms(values_us: np.ndarray) -> dict[str, Any]:
    """median and p95 of microsecond values, in milliseconds (None when nothing was measured)."""
    v = np.asarray(values_us, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"median_ms": None, "p95_ms": None}
    median, p95 = np.quantile(v, [0.5, 0.95])  # one partition for both
    return {"median_ms": clean_number(float(median) / 1000), "p95_ms": clean_number(float(p95) / 1000)}


def sketch_stats_ms(sketch: QuantileSketch) -> dict[str, Any]:
    """:func:`stats_ms` from a quantile sketch (each within its relative accuracy)."""
    if not sketch.count:
        return {"median_ms": None, "p95_ms": None}
    median, p95 = sketch.quantiles([0.5, 0.95])
    return {"median_ms": clean_number(float(median) / 1000), "p95_ms": clean_number(float(p95) / 1000)}


def _int_or_none(x: Any) -> int | None:
    try:
        return None if x is None or isinstance(x, bool) else int(x)
    except (TypeError, ValueError):
        return None


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc).isoformat(timespec="milliseconds")


def _exit_status(view: StoreView, exit_info: Mapping[str, Any]) -> str:
    status = exit_info.get("status")
    if isinstance(status, str) and status:
        return status
    infos = list(view.rank_info.values())
    if any(i.exit_status == "failed" or i.state == "died" for i in infos):
        return "failed"
    if infos and all(i.exit_status == "ok" for i in infos):
        return "ok"
    return "unknown"


def _run_meta(view: StoreView) -> dict[str, Any]:
    """The view's meta with a recording header's nested free-form ``meta`` folded in underneath."""
    nested = view.meta.get("meta")
    merged = dict(nested) if isinstance(nested, Mapping) else {}
    merged.update({k: v for k, v in view.meta.items() if k != "meta"})
    return merged


def run_section(view: StoreView) -> dict[str, Any]:
    meta = _run_meta(view)
    exit_info = view.attachments.get("exit")
    exit_info = exit_info if isinstance(exit_info, Mapping) else {}
    start_ns = run_start_ns(view)
    duration_s = run_duration_s(view)
    # the ranks' hosts; the recording's own host list only when no rank said where it ran
    hosts = {i.host for i in view.rank_info.values() if i.host}
    meta_hosts = meta.get("hosts")
    if not hosts and isinstance(meta_hosts, (list, tuple)):
        hosts = {str(h) for h in meta_hosts if h}
    if not hosts and isinstance(meta.get("host"), str) and meta["host"]:
        hosts = {meta["host"]}
    world = next(
        (w for w in (_int_or_none(meta.get("world_size")), _int_or_none(meta.get("expected_ranks"))) if w and w > 0),
        len(view.ranks),
    )
    return {
        "id": str(meta.get("run_id", "") or ""),
        "name": str(meta.get("run_name", "") or ""),
        "start_ns": start_ns,
        "start": _iso(start_ns),
        "duration_s": clean_number(duration_s),
        "world_size": world,
        "hosts": sorted(hosts),
        "exit_status": _exit_status(view, exit_info),
        "exit_code": _int_or_none(exit_info.get("exit_code")),
        "ranks": [
            {
                "rank": r,
                "host": view.rank_info[r].host if r in view.rank_info else "",
                "node_rank": view.rank_info[r].node_rank if r in view.rank_info else -1,
                "state": view.rank_info[r].state if r in view.rank_info else "unknown",
                "exit_status": view.rank_info[r].exit_status if r in view.rank_info else "",
            }
            for r in view.ranks
        ],
    }


def _share(x: float) -> float | None:
    return clean_number(round(x, 6)) if np.isfinite(x) else None


def steps_section(data: StepData, m: JobMeasures | None = None) -> dict[str, Any]:
    """Step statistics; ``overall`` is of the job (per step: the slowest rank's step time, the
    ranks' mean phase time), ``per_rank`` of each rank; shares are ratios of summed times."""
    m = job_measures(data) if m is None else m
    t = data.totals
    if t is None:
        job = job_series(data)
        overall = {p: stats_ms(job[p]) for p in SUMMARY_PHASES}
    else:  # a long recording read in bounded memory: the sketches of every step (1% relative error)
        overall = {p: sketch_stats_ms(t.job_step if p == "step" else t.job_phases[p]) for p in SUMMARY_PHASES}
    for part in m.phases:
        overall[part.name]["mean_ms"] = clean_number(part.mean_us / 1000) if np.isfinite(part.mean_us) else None
        overall[part.name]["share"] = _share(part.share)
    overall["step"]["mean_ms"] = clean_number(m.mean_step_us / 1000) if np.isfinite(m.mean_step_us) else None
    per_rank = []
    for r in data.ranks if t is None else [r for r, rt in t.per_rank.items() if rt.steps]:
        if t is None:
            rs = data.per_rank[r]
            phases = {"step": stats_ms(rs.step_us)}
            phases.update({p: stats_ms(rs.phases[p]) for p in PHASES})
            count = len(rs)
        else:
            rt = t.per_rank[r]
            phases = {"step": sketch_stats_ms(rt.step)}
            phases.update({p: sketch_stats_ms(rt.phases[p]) for p in PHASES})
            count = rt.steps
        per_rank.append({"rank": r, "count": count, "phases": phases})
    if t is None:
        count = len(data.steps)
        first = int(data.steps[0]) if len(data.steps) else None
        last = int(data.steps[-1]) if len(data.steps) else None
    else:
        count = t.steps
        first, last = (t.first_step, t.last_step) if t.steps else (None, None)
    return {
        "count": count,
        "recorded_rows": data.recorded_rows,
        "failed_rows": data.failed_rows,
        "warmup_steps": data.warmup_steps,
        "first": first,
        "last": last,
        "throughput_steps_per_s": _rounded(m.throughput_steps_per_s),
        "elapsed_s": _rounded(m.elapsed_s),
        "outside_step_share": _share(m.outside_share),
        "common_steps": m.common_steps,
        "slowest_rank": m.slowest_rank if m.slowest_rank >= 0 else None,
        "rank_skew_pct": _rounded(m.skew_pct),
        "overall": overall,
        "per_rank": per_rank,
    }


def _rounded(x: float) -> float | None:
    return clean_number(round(x, 6)) if np.isfinite(x) else None


def regions_section(view: StoreView, data: StepData, m: JobMeasures | None = None) -> list[dict[str, Any]]:
    """User regions (``traceml.trace_time``) over the analysed steps: time per step where entered,
    share of summed step time, and the part of it outside the standard phases (taken out of
    residual); then the regions timed between steps, as a share of the elapsed time."""
    m = job_measures(data) if m is None else m
    out = []
    for f in sorted(m.regions, key=lambda f: f.name):
        vals: list[np.ndarray] = []
        calls = 0
        own = total = 0.0
        for rs in data.per_rank.values():
            v = rs.regions.get(f.name)
            if v is None:
                continue
            vals.append(v[v > 0])
            calls += int(rs.region_calls.get(f.name, 0))
            total += float(np.nansum(v))
            own += float(np.nansum(rs.regions_own.get(f.name, np.zeros(0))))
        entered = np.concatenate(vals) if vals else np.empty(0)
        out.append(
            {
                "name": f.name,
                "where": "in steps",
                "samples": len(entered),
                "calls": calls,
                **stats_ms(entered),
                "mean_ms": clean_number(f.mean_us / 1000) if np.isfinite(f.mean_us) else None,
                "share": _share(f.share),
                "outside_phases_share": _share(own / total) if total > 0 else None,
            }
        )
    for name, share in sorted(m.between_regions.items()):
        out.append(
            {
                "name": name,
                "where": "between steps",
                "samples": int(data.between_calls.get(name, 0)),
                "calls": int(data.between_calls.get(name, 0)),
                "median_ms": None,
                "p95_ms": None,
                "mean_ms": None,
                "share": None,
                "outside_phases_share": None,
                "wall_share": _share(share),
            }
        )
    return out


def _peak(view: StoreView, table: str, col: str, rank: int) -> int | None:
    if view.rows(table, rank) == 0:
        return None
    v = np.asarray(view.columns(table, rank)[col], np.int64)
    v = v[v >= 0]
    return int(v.max()) if len(v) else None


def _max_opt(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def memory_section(view: StoreView) -> dict[str, Any]:
    per_rank = []
    for r in view.ranks:
        row = {
            "rank": r,
            "peak_rss_bytes": _peak(view, "process", "rss_bytes", r),
            "peak_gpu_alloc_bytes": _max_opt(
                _peak(view, "step_memory", "peak_alloc_bytes", r), _peak(view, "process", "gpu_alloc_bytes", r)
            ),
            "peak_gpu_reserved_bytes": _max_opt(
                _peak(view, "step_memory", "peak_reserved_bytes", r), _peak(view, "process", "gpu_reserved_bytes", r)
            ),
            "gpu_total_bytes": _peak(view, "process", "gpu_total_bytes", r),
        }
        if any(v is not None for k, v in row.items() if k != "rank"):
            per_rank.append(row)
    keys = ("peak_rss_bytes", "peak_gpu_alloc_bytes", "peak_gpu_reserved_bytes", "gpu_total_bytes")
    out: dict[str, Any] = {k: _max_opt(*(row[k] for row in per_rank)) for k in keys}
    out["per_rank"] = per_rank
    return out


def _finite(values: Any) -> np.ndarray:
    v = np.asarray(values, np.float64)
    return v[np.isfinite(v) & (v >= 0)]


def system_section(view: StoreView) -> dict[str, Any]:
    nodes: dict[int, dict[str, list[np.ndarray]]] = {}
    for r in view.table_ranks("system"):
        cols = view.columns("system", r)
        node = np.asarray(cols["node_rank"], np.int64)
        for n in sorted(set(node.tolist())):
            sel = node == n
            d = nodes.setdefault(int(n), {"cpu": [], "used": [], "total": []})
            d["cpu"].append(_finite(np.asarray(cols["cpu_pct"])[sel]))
            d["used"].append(_finite(np.asarray(cols["ram_used_bytes"])[sel]))
            d["total"].append(_finite(np.asarray(cols["ram_total_bytes"])[sel]))
    node_rows = []
    for n in sorted(nodes):
        cpu, used, total = (np.concatenate(nodes[n][k]) for k in ("cpu", "used", "total"))
        node_rows.append(
            {
                "node_rank": n,
                "samples": len(cpu),
                "cpu_pct_mean": clean_number(cpu.mean()) if len(cpu) else None,
                "cpu_pct_max": clean_number(cpu.max()) if len(cpu) else None,
                "ram_used_max_bytes": int(used.max()) if len(used) else None,
                "ram_total_bytes": int(total.max()) if len(total) else None,
            }
        )
    gpus: dict[tuple[int, int], dict[str, list[np.ndarray]]] = {}
    for r in view.table_ranks("system_gpu"):
        cols = view.columns("system_gpu", r)
        node = np.asarray(cols["node_rank"], np.int64)
        idx = np.asarray(cols["gpu_idx"], np.int64)
        for key in sorted({(int(a), int(b)) for a, b in zip(node, idx, strict=True)}):
            sel = (node == key[0]) & (idx == key[1])
            d = gpus.setdefault(key, {})
            for c in ("util_pct", "mem_used_bytes", "mem_total_bytes", "temp_c", "power_w"):
                d.setdefault(c, []).append(_finite(np.asarray(cols[c])[sel]))
    gpu_rows = []
    for key in sorted(gpus):
        g = {c: np.concatenate(v) for c, v in gpus[key].items()}
        gpu_rows.append(
            {
                "node_rank": key[0],
                "gpu_idx": key[1],
                "samples": len(g["util_pct"]),
                "util_pct_mean": clean_number(g["util_pct"].mean()) if len(g["util_pct"]) else None,
                "util_pct_p95": clean_number(np.percentile(g["util_pct"], 95)) if len(g["util_pct"]) else None,
                "mem_used_max_bytes": int(g["mem_used_bytes"].max()) if len(g["mem_used_bytes"]) else None,
                "mem_total_bytes": int(g["mem_total_bytes"].max()) if len(g["mem_total_bytes"]) else None,
                "temp_c_max": clean_number(g["temp_c"].max()) if len(g["temp_c"]) else None,
                "power_w_mean": clean_number(g["power_w"].mean()) if len(g["power_w"]) else None,
            }
        )
    return {"nodes": node_rows, "gpus": gpu_rows}


def integrity_section(view: StoreView, data: StepData) -> dict[str, Any]:
    src = dict(view.integrity) if view.integrity is not None else None
    status = str(src.get("status", "unknown")) if src is not None else "live"
    skipped_raw = src.get("skipped", 0) if src is not None else 0
    if isinstance(skipped_raw, (list, tuple)):
        skipped = len(skipped_raw)
    else:
        skipped = _int_or_none(skipped_raw) or 0
    by_table: dict[str, int] = {}
    for info in view.rank_info.values():
        for t, n in info.drops.items():
            by_table[t] = by_table.get(t, 0) + int(n)
    dropped = sum(by_table.values())
    evicted = sum(int(v) for v in view.evicted.values())
    died = sorted(r for r, i in view.rank_info.items() if i.state == "died")
    return {
        "status": status,
        "complete": status in ("complete", "live") and dropped == 0 and evicted == 0 and skipped == 0,
        "recovered": status == "recovered",
        "message": str(src.get("message", "") or "") if src is not None else "",
        "lost": {
            "bytes": _int_or_none(src.get("lost_bytes")) or 0 if src is not None else 0,
            "rows_dropped": dropped,
            "rows_dropped_by_table": dict(sorted(by_table.items())),
            "rows_evicted": evicted,
            "skipped_records": skipped,
            "ranks_died": died,
            "failed_step_rows": data.failed_rows,
        },
    }


def traceml_section(view: StoreView, median_step_ms: float | None) -> dict[str, Any]:
    """What traceml itself cost, from each rank's ``traceml_cost`` table (its last, cumulative row):
    the sampled time on the training thread per step plus its threads' CPU time per step; the
    median over ranks, and its share of the job's median step."""
    per_rank = []
    if view.has("traceml_cost"):
        for r in view.table_ranks("traceml_cost"):
            cols = view.columns("traceml_cost", r)
            steps_col = cols.get("steps")
            if steps_col is None or not len(steps_col):
                continue
            # every column is cumulative: its largest value is the rank's latest
            steps, sampled = int(steps_col.max()), int(cols["sampled_steps"].max())
            if steps <= 0 or sampled <= 0:
                continue
            thread_us = int(cols["sampled_ns"].max()) / sampled / 1000.0
            threads_ns = int(cols["threads_cpu_ns"].max())
            background_us = threads_ns / steps / 1000.0 if threads_ns >= 0 else 0.0
            per_rank.append(
                {
                    "rank": int(r),
                    "us_per_step": clean_number(thread_us + background_us),
                    "training_thread_us_per_step": clean_number(thread_us),
                    "threads_cpu_us_per_step": clean_number(background_us) if threads_ns >= 0 else None,
                    "sampled_steps": sampled,
                }
            )
    if not per_rank:
        return {"overhead_us_per_step": None, "overhead_share": None, "per_rank": []}
    med = float(np.median([p["us_per_step"] for p in per_rank]))
    share = med / (median_step_ms * 1000.0) if median_step_ms else None
    return {
        "overhead_us_per_step": clean_number(med),
        "overhead_share": clean_number(share) if share is not None else None,
        "per_rank": per_rank,
    }


def build_summary(view: StoreView, *, recent_steps: int = th.RECENT_STEPS) -> dict[str, Any]:
    """The versioned summary of the run in ``view`` (whole run, and its last ``recent_steps``)."""
    data = step_data(view)
    m = job_measures(data)
    steps = steps_section(data, m)
    return {
        "schema_version": SCHEMA_VERSION,
        "run": run_section(view),
        "steps": steps,
        "traceml": traceml_section(view, steps["overall"]["step"]["median_ms"]),
        "regions": regions_section(view, data, m),
        "diagnosis": diagnose_steps(view, data).to_dict(),
        "diagnosis_recent": diagnose(view, last_n=recent_steps).to_dict(),
        "memory": memory_section(view),
        "system": system_section(view),
        "integrity": integrity_section(view, data),
        "residual": residual_section(view, data),
    }


def residual_section(view: StoreView, data: StepData) -> dict[str, Any] | None:
    """Where the residual goes, from the stack sampler (None when the run has no samples)."""
    profile = residual_profile(view, data)
    return profile.to_dict() if profile is not None else None


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """A few plain lines for a terminal: the verdict, the typical step, the other findings."""
    diag = summary.get("diagnosis", {})
    primary = diag.get("primary", {})
    steps = summary.get("steps", {})
    step = steps.get("overall", {}).get("step", {})
    lines = [f"[{primary.get('severity', 'info')}] {primary.get('kind', '?')}: {primary.get('summary', '')}"]
    if step.get("median_ms") is not None:
        lines.append(
            f"steps: {steps.get('count', 0)} analysed, median {step['median_ms']:.2f} ms, "
            f"p95 {step['p95_ms']:.2f} ms (of the job), {steps.get('throughput_steps_per_s') or 0:.2f} steps/s measured"
            + (
                f", {100 * steps['outside_step_share']:.0f}% of wall time outside steps"
                if steps.get("outside_step_share") is not None
                else ""
            )
        )
    for f in diag.get("findings", []):
        if (f.get("kind"), f.get("rank"), f.get("summary")) != (
            primary.get("kind"),
            primary.get("rank"),
            primary.get("summary"),
        ):
            lines.append(f"[{f.get('severity')}] {f.get('kind')}: {f.get('summary')}")
    mem = summary.get("memory", {})
    peaks = [
        f"{label} {fmt_bytes(mem[k])}"
        for k, label in (("peak_rss_bytes", "RSS"), ("peak_gpu_alloc_bytes", "GPU allocated"))
        if mem.get(k) is not None
    ]
    if peaks:
        lines.append("peak memory: " + ", ".join(peaks))
    cost = traceml_cost_text(summary)
    if cost:
        lines.append(cost)
    integ = summary.get("integrity", {})
    if not integ.get("complete", True):
        lost = integ.get("lost", {})
        lines.append(
            f"integrity: {integ.get('status')}; {lost.get('rows_dropped', 0)} rows dropped, "
            f"{lost.get('rows_evicted', 0)} evicted, {lost.get('skipped_records', 0)} records skipped"
        )
    return lines
