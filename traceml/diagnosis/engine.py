"""``diagnose(view)``: run every rule over one window and choose the primary diagnosis."""

from __future__ import annotations

from collections.abc import Mapping

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.comm import communication_bound
from traceml.diagnosis.findings import (
    COMPUTE_BOUND,
    HEALTHY,
    INSUFFICIENT_DATA,
    RESIDUAL_HEAVY,
    STRAGGLER,
    Diagnosis,
    Finding,
    Severity,
    Window,
    severity_rank,
)
from traceml.diagnosis.memory import memory_creep
from traceml.diagnosis.pressure import resource_findings
from traceml.diagnosis.stacks import explain_residual
from traceml.diagnosis.step_rules import (
    compute_bound,
    compute_measured,
    h2d_bound,
    input_bound,
    ms,
    region_heavy,
    residual_heavy,
    straggler,
)
from traceml.diagnosis.steps import StepData, step_data
from traceml.diagnosis.system import low_gpu_utilization
from traceml.store import StoreView
from traceml.views.measures import job_measures


def _window(data: StepData) -> Window:
    span = data.time_range()
    t = data.totals
    first: int | None
    last: int | None
    if t is not None and t.steps:  # a bounded read: the whole run's steps, not the sample's
        first, last, steps = t.first_step, t.last_step, t.steps
        ends = [rt for rt in t.per_rank.values() if rt.steps]
        span = (min(rt.start_ns for rt in ends), max(rt.end_ns for rt in ends)) if ends else span
    else:
        first = int(data.steps[0]) if len(data.steps) else None
        last = int(data.steps[-1]) if len(data.steps) else None
        steps = len(data.steps)
    return Window(
        first_step=first,
        last_step=last,
        steps=steps,
        ranks=data.ranks,
        warmup_steps=data.warmup_steps,
        failed_rows=data.failed_rows,
        last_n=data.last_n,
        start_ns=span[0] if span else None,
        end_ns=span[1] if span else None,
    )


def _insufficient(data: StepData, missing: list[str], severity: Severity) -> Finding:
    steps = data.min_rank_steps()
    return Finding(
        kind=INSUFFICIENT_DATA,
        severity=severity,
        rank=None,
        summary="insufficient data: missing " + "; ".join(missing),
        evidence={
            "steps": steps,
            "min_steps": th.MIN_STEPS,
            "recorded_rows": data.recorded_rows,
            "failed_rows": data.failed_rows,
            "warmup_steps": data.warmup_steps,
        },
    )


def diagnose(view: StoreView, *, last_n: int | None = None) -> Diagnosis:
    """Classify the run in ``view`` (whole run, or its last ``last_n`` analysed steps).

    Failed steps and the warm-up (see :func:`traceml.diagnosis.steps.warmup_count`) are skipped.
    """
    return diagnose_steps(view, step_data(view, last_n=last_n))


def diagnose_steps(view: StoreView, data: StepData) -> Diagnosis:
    """:func:`diagnose` over steps already selected by :func:`~traceml.diagnosis.steps.step_data`."""
    findings: list[Finding] = []
    missing: list[str] = []  # signals whose absence stopped a rule
    core_missing: list[str] = []  # absences that stop the run being classified

    enough_steps = data.min_rank_steps() >= th.MIN_STEPS and not data.empty
    if data.recorded_rows == 0:
        core_missing.append(_no_steps_reason(view))
    elif data.empty:
        core_missing.append(
            f"successful steps after warm-up ({data.recorded_rows} rows recorded, {data.failed_rows} failed)"
        )
    elif not enough_steps:
        core_missing.append(
            f"enough steps: {data.min_rank_steps()} analysable on the shortest rank, the step rules need {th.MIN_STEPS}"
        )

    if enough_steps:
        findings += [f for f in (input_bound(data), straggler(data, view), h2d_bound(view, data)) if f is not None]
        if compute_measured(data):
            findings += [f for f in (residual_heavy(data),) if f is not None]
            findings = explain_residual(view, data, findings)  # names the residual; reading data is input
            findings += region_heavy(data)
            # a synchronised straggler makes the others wait inside backward, which reads as compute
            synced_straggler = any(f.kind == STRAGGLER and f.evidence.get("steps_synchronised") == 1 for f in findings)
            comm = communication_bound(view, data)
            if comm is not None:
                findings.append(comm)
                # collectives called in the step are outside every phase: their time is the residual's
                left = float(comm.evidence.get("share") or 0.0)
                findings = [
                    f
                    for f in findings
                    if not (
                        f.kind == RESIDUAL_HEAVY and float(f.evidence.get("share") or 0.0) - left < th.RESIDUAL_WARN
                    )
                ]
            cb = compute_bound(data)
            if cb is not None and not synced_straggler and comm is None:  # all-reduce waits read as backward
                findings.append(cb)
        else:
            core_missing.append("forward/backward timings (residual and compute rules need the model's phases)")
        if not view.has("step_gpu"):
            missing.append("step_gpu (GPU clock): H2D rule skipped")
        if len(data.ranks) < 2:
            missing.append("a second rank: straggler rule skipped")
    creep, short = memory_creep(view, data)
    findings += creep
    missing += [f"memory series {s}: creep rule skipped" for s in short]
    if not (view.has("process") or view.has("step_memory")):
        missing.append("process/step_memory samples: memory creep rule skipped")
    gpu = low_gpu_utilization(view, data)
    if gpu is not None:
        findings.append(gpu)
    elif not view.has("system_gpu"):
        missing.append("system_gpu (NVML): GPU utilization rule skipped")

    findings += resource_findings(view, data)
    if core_missing:
        findings.append(_insufficient(data, core_missing, "warn" if not enough_steps else "info"))
    findings.sort(key=Finding.sort_key)
    alarms = [f for f in findings if severity_rank(f.severity) >= severity_rank("warn")]
    if alarms:
        primary = alarms[0]
    elif any(f.kind == INSUFFICIENT_DATA for f in findings):
        primary = next(f for f in findings if f.kind == INSUFFICIENT_DATA)
    elif any(f.kind == COMPUTE_BOUND for f in findings):
        primary = next(f for f in findings if f.kind == COMPUTE_BOUND)
    else:
        primary = _healthy(data)
        findings.append(primary)
    return Diagnosis(primary=primary, findings=findings, window=_window(data), missing=tuple(core_missing + missing))


def _no_steps_reason(view: StoreView) -> str:
    """Why no step was recorded: the run ended before its first step, or the loop is not traced."""
    exit_info = view.attachments.get("exit")
    exit_info = exit_info if isinstance(exit_info, Mapping) else {}
    status = str(exit_info.get("status", "") or "")
    code = exit_info.get("exit_code")
    failed = [r for r, i in view.rank_info.items() if i.exit_status == "failed" or i.state == "died"]
    if status in ("failed", "interrupted") or failed or (isinstance(code, int) and code != 0):
        how = status or "failed"
        if isinstance(code, int) and not isinstance(code, bool):
            how += f", exit status {code}"
        signal = exit_info.get("signal")
        if isinstance(signal, str) and signal:
            how += f", {signal}"
        if failed and not status:
            how += f" (rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, sorted(failed)))})"
        return f"a first step: the run ended ({how}) before its first step finished; the script's own output says why"
    return (
        "step timings (no step_time rows: under `traceml run` steps come from optimizer.step() unless"
        " --no-auto-steps; otherwise wrap the loop in traceml.trace_step)"
    )


def _healthy(data: StepData) -> Finding:
    m = job_measures(data, parts=False)
    median, n_steps = m.median_step_us, m.steps  # the job's, as every view says
    return Finding(
        kind=HEALTHY,
        severity="info",
        rank=None,
        summary=(
            f"healthy: no bottleneck past its threshold over {n_steps} steps on "
            f"{len(data.ranks)} rank{'s' if len(data.ranks) != 1 else ''} (median step {ms(median)})"
        ),
        evidence={"steps": n_steps, "ranks": len(data.ranks), "step_median_us": median},
    )
