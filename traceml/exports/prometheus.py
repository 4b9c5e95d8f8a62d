"""A run summary as a Prometheus text-format file for node-exporter's textfile collector.

Written atomically (temp file + rename); label values from a recording are bounded and escaped.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from traceml.errors import ExportError
from traceml.outpaths import check_new_file

#: label values are cut to this many characters
MAX_LABEL_CHARS = 128
#: per-rank series for at most this many ranks
MAX_RANKS = 1024
_PHASES = ("dataloader", "h2d", "forward", "backward", "optimizer", "residual")
_SEVERITY = {"info": 0, "warn": 1, "critical": 2}


def escape_label(value: object) -> str:
    """A label value for the text format: bounded, control characters dropped, ``\\ " \\n`` escaped."""
    text = "".join(ch for ch in str(value)[:MAX_LABEL_CHARS] if ch == "\n" or (ord(ch) >= 0x20 and ord(ch) != 0x7F))
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> float | None:
    if not isinstance(value, (int, float)):  # bool is an int: 1 / 0
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _fmt(value: float) -> str:
    return format(value, ".12g")


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


class _Family:
    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, labels: Mapping[str, object], value: Any, scale: float = 1.0) -> None:
        number = _number(value)
        if number is not None:
            self.samples.append(({k: str(v) for k, v in labels.items()}, number * scale))

    def lines(self, common: Mapping[str, str]) -> Iterable[str]:
        if not self.samples:
            return
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in self.samples:
            merged = {**common, **labels}
            body = ",".join(f'{k}="{escape_label(v)}"' for k, v in merged.items())
            yield f"{self.name}{{{body}}} {_fmt(value)}"


def render_textfile(summary: Mapping[str, Any], *, extra_labels: Mapping[str, str] | None = None) -> str:
    """The summary's final metrics as Prometheus text: step time median/p95 per rank, phase times
    and shares, throughput, peak memory, GPU utilisation, the verdict and findings as labelled
    gauges, run duration, exit code, integrity.  Every series carries a ``run`` label."""
    run = _map(summary.get("run"))
    steps = _map(summary.get("steps"))
    run_label = str(run.get("name") or run.get("id") or "unnamed")
    common = {"run": run_label, **dict(extra_labels or {})}

    fams: list[_Family] = []

    def family(name: str, help_text: str) -> _Family:
        fam = _Family(name, help_text)
        fams.append(fam)
        return fam

    info = family("traceml_run_info", "The run a series belongs to (always 1).")
    info.add({"run_id": run.get("id", ""), "exit_status": run.get("exit_status", "unknown")}, 1)
    family("traceml_run_duration_seconds", "Wall time of the run.").add({}, run.get("duration_s"))
    family("traceml_run_world_size", "Ranks in the run.").add({}, run.get("world_size"))
    family("traceml_run_exit_code", "The training's exit code.").add({}, run.get("exit_code"))
    start_ns = _number(run.get("start_ns"))
    duration = _number(run.get("duration_s"))
    if start_ns is not None and duration is not None:
        family("traceml_run_end_timestamp_seconds", "When the run ended (Unix time).").add(
            {}, start_ns / 1e9 + duration
        )
    family("traceml_steps", "Steps analysed (warm-up excluded).").add({}, steps.get("count"))
    family("traceml_throughput_steps_per_second", "Steps per second, measured over the wall time they took.").add(
        {}, steps.get("throughput_steps_per_s")
    )

    step_time = family("traceml_step_time_seconds", "Step time per rank over the analysed steps (stat: median|p95).")
    for row in _list(steps.get("per_rank"))[:MAX_RANKS]:
        row = _map(row)
        rank = row.get("rank")
        if isinstance(rank, int) and not isinstance(rank, bool):
            stats = _map(_map(row.get("phases")).get("step"))
            step_time.add({"rank": rank, "stat": "median"}, stats.get("median_ms"), 1e-3)
            step_time.add({"rank": rank, "stat": "p95"}, stats.get("p95_ms"), 1e-3)

    overall = _map(steps.get("overall"))
    phase_time = family("traceml_phase_time_seconds", "Time of each phase of the step, job-wide (stat: median|p95).")
    share = family("traceml_phase_share_ratio", "A phase's share of the summed step time (0..1).")
    step_median = _number(_map(overall.get("step")).get("median_ms"))
    for phase in _PHASES:
        stats = _map(overall.get(phase))
        phase_time.add({"phase": phase, "stat": "median"}, stats.get("median_ms"), 1e-3)
        phase_time.add({"phase": phase, "stat": "p95"}, stats.get("p95_ms"), 1e-3)
        median = _number(stats.get("median_ms"))
        if _number(stats.get("share")) is not None:  # the share every view shows (a ratio of sums)
            share.add({"phase": phase}, stats.get("share"))
        elif median is not None and step_median:  # a summary written before shares were recorded
            share.add({"phase": phase}, median / step_median)

    memory = _map(summary.get("memory"))
    peak = family("traceml_peak_memory_bytes", "Peak memory per rank (kind: rss|gpu_allocated|gpu_reserved).")
    for row in _list(memory.get("per_rank"))[:MAX_RANKS]:
        row = _map(row)
        rank = row.get("rank")
        if isinstance(rank, int) and not isinstance(rank, bool):
            peak.add({"rank": rank, "kind": "rss"}, row.get("peak_rss_bytes"))
            peak.add({"rank": rank, "kind": "gpu_allocated"}, row.get("peak_gpu_alloc_bytes"))
            peak.add({"rank": rank, "kind": "gpu_reserved"}, row.get("peak_gpu_reserved_bytes"))

    gpu_util = family("traceml_gpu_utilization_ratio", "Mean GPU utilisation per device (0..1).")
    gpu_mem = family("traceml_gpu_memory_used_bytes", "Most GPU memory used per device.")
    for row in _list(_map(summary.get("system")).get("gpus"))[:MAX_RANKS]:
        row = _map(row)
        labels = {"node": row.get("node_rank", ""), "gpu": row.get("gpu_idx", "")}
        gpu_util.add(labels, row.get("util_pct_mean"), 1e-2)
        gpu_mem.add(labels, row.get("mem_used_max_bytes"))

    diag = _map(summary.get("diagnosis"))
    primary = _map(diag.get("primary"))
    verdict = family(
        "traceml_verdict",
        "The run's primary diagnosis (always 1; kind and severity are labels, see docs/diagnosis.md).",
    )
    if primary.get("kind"):
        verdict.add({"kind": primary.get("kind"), "severity": primary.get("severity", "info")}, 1)
    level = family("traceml_verdict_severity", "Severity of the primary diagnosis (0 info, 1 warn, 2 critical).")
    if primary.get("kind"):
        level.add({}, _SEVERITY.get(str(primary.get("severity")), 0))
    finding = family("traceml_finding", "Each diagnosis finding (always 1; labels kind, severity, rank).")
    seen: set[tuple[str, str, str]] = set()
    for item in _list(diag.get("findings"))[:64]:
        item = _map(item)
        key = (str(item.get("kind", "")), str(item.get("severity", "")), str(item.get("rank", "")))
        if key[0] and key not in seen:  # one sample per label set
            seen.add(key)
            finding.add({"kind": key[0], "severity": key[1], "rank": "" if key[2] == "None" else key[2]}, 1)

    integrity = _map(summary.get("integrity"))
    family("traceml_recording_complete", "1 when nothing was lost from the recording.").add(
        {}, integrity.get("complete")
    )
    family("traceml_recording_lost_bytes", "Bytes of the recording skipped as damaged.").add(
        {}, _map(integrity.get("lost")).get("bytes")
    )

    out: list[str] = []
    for fam in fams:
        out.extend(fam.lines(common))
    return "\n".join(out) + "\n"


def write_textfile(text: str, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory, then rename).

    An existing file is replaced only with ``overwrite`` (``--overwrite``); a link never."""
    target = Path(path)
    check_new_file(target, overwrite=overwrite, option="-o")
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)  # the collector usually runs as another user
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise ExportError(
            f"cannot write {str(target)!r}: {exc.strerror or exc}; choose a writable -o path"
            " (node-exporter reads *.prom from its --collector.textfile.directory)"
        ) from exc
    return target
