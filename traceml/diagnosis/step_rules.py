"""Step-time rules: where the typical step's time goes, and which rank holds the others back.

Each rule takes :class:`~traceml.diagnosis.steps.StepData` (and the view where it needs another
table) and returns findings plus the names of signals it missed.  Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.findings import (
    COMPUTE_BOUND,
    H2D_BOUND,
    INPUT_BOUND,
    REGION_HEAVY,
    RESIDUAL_HEAVY,
    STRAGGLER,
    Finding,
    Severity,
)
from traceml.diagnosis.steps import COMPUTE_PHASES, RankSteps, StepData
from traceml.schema import PHASES
from traceml.store import StoreView

#: phases DDP does not equalise across ranks: a slow rank shows up here, the others wait in backward
NON_EQUALISED = ("dataloader", "h2d", "forward", "optimizer", "residual")
CAUSES: dict[str, tuple[str, ...]] = {
    "input": ("dataloader", "h2d"),
    "compute": ("forward", "backward", "optimizer"),
    "other": ("residual",),
}
#: the straggler cause for a rank's own excess of exposed collective time (``step_comm``)
COMMUNICATION = "communication"
COMM_TABLE = "step_comm"


def ms(us: float) -> str:
    return f"{us / 1000:.1f} ms" if abs(us) >= 100 else f"{us / 1000:.2f} ms"


def pct(share: float) -> str:
    return f"{share * 100:.0f}%"


def grade(score: float, warn: float, critical: float, steps: int, *, lower_is_worse: bool = False) -> Severity | None:
    """warn/critical for a score past its threshold; critical needs MIN_STEPS_CRITICAL steps."""
    if lower_is_worse:
        hit_critical, hit_warn = score <= critical, score <= warn
    else:
        hit_critical, hit_warn = score >= critical, score >= warn
    if hit_critical:
        return "critical" if steps >= th.MIN_STEPS_CRITICAL else "warn"
    if hit_warn:
        return "warn"
    return None


def _share(part: np.ndarray, whole: np.ndarray) -> float:
    ok = np.isfinite(part) & np.isfinite(whole) & (whole > 0)
    total = float(whole[ok].sum())
    return float(part[ok].sum()) / total if total > 0 else float("nan")


class Shares(dict[int, float]):
    """Each rank's share (its summed part over its summed step time) and the job's: the ratio of
    the sums over every rank, with the mean per rank-step of both (the figures quoted beside it)."""

    job: float = float("nan")
    part_mean_us: float = float("nan")
    step_mean_us: float = float("nan")


def _per_rank_shares(data: StepData, part: Callable[[RankSteps], np.ndarray]) -> Shares:
    shares = Shares()
    part_sum = step_sum = 0.0
    n = 0
    for r in data.ranks:
        rs = data.per_rank[r]
        values = part(rs)
        s = _share(values, rs.step_us)
        if np.isfinite(s):
            shares[r] = s
            ok = np.isfinite(values) & np.isfinite(rs.step_us) & (rs.step_us > 0)
            part_sum += float(values[ok].sum())
            step_sum += float(rs.step_us[ok].sum())
            n += int(ok.sum())
    if step_sum > 0 and n:
        shares.job = part_sum / step_sum
        shares.part_mean_us = part_sum / n
        shares.step_mean_us = step_sum / n
    return shares


def _typical(shares: dict[int, float]) -> tuple[float, int, float]:
    """the job's share (ratio of sums over ranks; the median of the ranks' shares for a plain dict),
    the worst rank and its share."""
    worst = max(shares, key=lambda r: shares[r])
    job = getattr(shares, "job", float("nan"))
    typical = job if np.isfinite(job) else float(np.median(list(shares.values())))
    return typical, worst, shares[worst]


def _where(n: int, worst: int, worst_share: float) -> str:
    """How a share finding names its ranks: all of several, or the one rank."""
    return f"summed over {n} ranks, worst rank {worst} at {pct(worst_share)}" if n > 1 else f"rank {worst}"


def _median_us(data: StepData, phase: str) -> float:
    vals = np.concatenate(
        [data.per_rank[r].phases[phase] if phase != "step" else data.per_rank[r].step_us for r in data.ranks]
    )
    vals = vals[np.isfinite(vals)]
    return float(np.median(vals)) if len(vals) else float("nan")


def _share_finding(
    data: StepData, kind: str, shares: Shares, warn: float, critical: float, what: str, phase_us: float
) -> Finding | None:
    if not shares:
        return None
    typical, worst, worst_share = _typical(shares)
    steps = data.min_rank_steps()
    severity = grade(typical, warn, critical, steps)
    if severity is None:
        return None
    step_us = _median_us(data, "step")
    n = len(shares)
    where = _where(n, worst, worst_share)
    return Finding(
        kind=kind,
        severity=severity,
        rank=None if n > 1 else worst,
        summary=f"{what} is {pct(typical)} of step time ({where}); "
        f"{ms(shares.part_mean_us)} of a {ms(shares.step_mean_us)} step on average",
        evidence={
            "share": typical,
            "worst_rank": worst,
            "worst_rank_share": worst_share,
            "phase_median_us": phase_us,
            "step_median_us": step_us,
            "phase_mean_us": shares.part_mean_us,
            "step_mean_us": shares.step_mean_us,
            "warn_share": warn,
            "critical_share": critical,
            "steps": steps,
            "ranks": n,
        },
    )


def input_bound(data: StepData) -> Finding | None:
    shares = _per_rank_shares(data, lambda rs: rs.phases["dataloader"])
    return _share_finding(
        data,
        INPUT_BOUND,
        shares,
        th.INPUT_WARN,
        th.INPUT_CRITICAL,
        "input-bound: dataloader wait",
        _median_us(data, "dataloader"),
    )


def compute_measured(data: StepData) -> bool:
    return any(data.per_rank[r].measured(p) for r in data.ranks for p in ("forward", "backward"))


def residual_heavy(data: StepData) -> Finding | None:
    shares = _per_rank_shares(data, lambda rs: rs.phases["residual"])
    return _share_finding(
        data,
        RESIDUAL_HEAVY,
        shares,
        th.RESIDUAL_WARN,
        th.RESIDUAL_CRITICAL,
        "residual-heavy: time outside the standard phases and named regions",
        _median_us(data, "residual"),
    )


def region_heavy(data: StepData, limit: int = 3) -> list[Finding]:
    """Named regions (``traceml.trace_time``) whose time outside the standard phases is a large
    share of the step: graded as residual is (that time would be residual had it not been named)."""
    out = []
    for name in data.region_names():

        def own(rs: RankSteps, name: str = name) -> np.ndarray:
            return rs.regions_own.get(name, np.zeros(len(rs)))

        shares = _per_rank_shares(data, own)
        if not shares:
            continue
        typical, worst, worst_share = _typical(shares)
        steps = data.min_rank_steps()
        severity = grade(typical, th.RESIDUAL_WARN, th.RESIDUAL_CRITICAL, steps)
        if severity is None:
            continue
        n = len(shares)
        out.append(
            Finding(
                kind=REGION_HEAVY,
                severity=severity,
                rank=None if n > 1 else worst,
                summary=f"{name}: {pct(typical)} of the step (named region, outside the standard phases; "
                f"{_where(n, worst, worst_share)}); {ms(shares.part_mean_us)} of a {ms(shares.step_mean_us)} "
                "step on average",
                labels={"region": name},
                evidence={
                    "share": typical,
                    "worst_rank": worst,
                    "worst_rank_share": worst_share,
                    "region_mean_us": shares.part_mean_us,
                    "step_mean_us": shares.step_mean_us,
                    "warn_share": th.RESIDUAL_WARN,
                    "critical_share": th.RESIDUAL_CRITICAL,
                    "steps": steps,
                    "ranks": n,
                },
            )
        )
    out.sort(key=lambda f: -float(f.evidence["share"] or 0.0))
    return out[:limit]


def compute_bound(data: StepData) -> Finding | None:
    def compute(rs: RankSteps) -> np.ndarray:
        total = np.zeros(len(rs))
        for p in COMPUTE_PHASES:
            total = total + np.nan_to_num(rs.phases[p])
        return total

    shares = _per_rank_shares(data, compute)
    if not shares:
        return None
    typical, worst, _ = _typical(shares)
    if typical < th.COMPUTE_BOUND_SHARE:
        return None
    return Finding(
        kind=COMPUTE_BOUND,
        severity="info",
        rank=None,
        summary=(
            f"compute-bound: forward + backward + optimizer take {pct(typical)} of step time "
            f"(summed over {len(shares)} rank{'s' if len(shares) > 1 else ''}); speed comes from the model or the device"
        ),
        evidence={
            "share": typical,
            "threshold_share": th.COMPUTE_BOUND_SHARE,
            "forward_median_us": _median_us(data, "forward"),
            "backward_median_us": _median_us(data, "backward"),
            "optimizer_median_us": _median_us(data, "optimizer"),
            "step_median_us": _median_us(data, "step"),
            "steps": data.min_rank_steps(),
            "ranks": len(shares),
        },
    )


def h2d_bound(view: StoreView, data: StepData) -> Finding | None:
    """H2D share on the GPU clock (STEP_GPU); None when no rank has GPU-timed H2D in the window."""
    shares: dict[int, float] = {}
    h2d_all: list[np.ndarray] = []
    steps = 0
    for r in data.ranks:
        if view.rows("step_gpu", r) == 0:
            continue
        g = view.columns("step_gpu", r)
        rs = data.per_rank[r]
        gstep = np.asarray(g["step"], np.int64)
        keep = np.isin(gstep, rs.step)
        h2d = np.asarray(g["h2d_gpu_us"], np.float64)[keep]
        whole = np.asarray(g["step_gpu_us"], np.float64)[keep]
        cpu = rs.step_us[np.clip(np.searchsorted(rs.step, gstep[keep]), 0, len(rs.step) - 1)]
        whole = np.where(whole > 0, whole, cpu)
        ok = h2d >= 0
        if not ok.any():
            continue
        s = _share(h2d[ok], whole[ok])
        if np.isfinite(s):
            shares[r] = s
            h2d_all.append(h2d[ok])
            steps = int(ok.sum()) if not steps else min(steps, int(ok.sum()))
    if not shares:
        return None
    typical, worst, worst_share = _typical(shares)
    severity = grade(typical, th.H2D_WARN, th.H2D_CRITICAL, steps)
    if severity is None:
        return None
    h2d_med = float(np.median(np.concatenate(h2d_all)))
    n = len(shares)
    where = _where(n, worst, worst_share)
    return Finding(
        kind=H2D_BOUND,
        severity=severity,
        rank=None if n > 1 else worst,
        summary=f"H2D-bound: host-to-device copies take {pct(typical)} of GPU step time ({where}); {ms(h2d_med)} per step",
        evidence={
            "share": typical,
            "worst_rank": worst,
            "worst_rank_share": worst_share,
            "h2d_gpu_median_us": h2d_med,
            "warn_share": th.H2D_WARN,
            "critical_share": th.H2D_CRITICAL,
            "steps": steps,
            "ranks": n,
        },
    )


def others_median(m: np.ndarray) -> np.ndarray:
    """[rank, step] -> [rank, step]: for each cell, the median of the *other* ranks at that step.

    One sort per column: removing a rank's own value from the sorted column shifts the indices
    at and above its position by one, so every rank's reference comes from the same sort.
    """
    r = m.shape[0]
    order = np.argsort(m, axis=0, kind="stable")
    srt = np.take_along_axis(m, order, axis=0)
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(r)[:, None], order.shape), axis=0)
    n = r - 1

    def nth_other(j: int) -> np.ndarray:
        return np.take_along_axis(srt, j + (j >= pos), axis=0)

    return (nth_other((n - 1) // 2) + nth_other(n // 2)) / 2


def _median_delta(row: np.ndarray, ref: np.ndarray) -> float:
    d = row - ref
    d = d[np.isfinite(d)]
    return float(np.median(d)) if len(d) else 0.0


def _exposed_comm(view: StoreView | None, data: StepData, steps: np.ndarray) -> np.ndarray | None:
    """[rank, step] exposed collective time from ``step_comm`` (0 where a step has no row), or None."""
    if view is None or not view.has(COMM_TABLE):
        return None
    out = np.zeros((len(data.ranks), len(steps)))
    order = np.argsort(steps, kind="stable")
    srt = steps[order]
    seen = False
    for i, r in enumerate(data.ranks):
        if view.rows(COMM_TABLE, r) == 0:
            continue
        cols = view.columns(COMM_TABLE, r)
        cstep = np.asarray(cols["step"], np.int64)
        exposed = np.asarray(cols["exposed_us"], np.float64)
        ok = np.isfinite(exposed) & (exposed >= 0)
        pos = np.minimum(np.searchsorted(srt, cstep), len(srt) - 1)
        hit = ok & (srt[pos] == cstep)
        np.add.at(out[i], order[pos[hit]], exposed[hit])
        seen = seen or bool(hit.any())
    return out if seen else None


def straggler(data: StepData, view: StoreView | None = None) -> Finding | None:
    """The rank whose non-equalised time (or, without DDP sync, whose step) exceeds the others'.

    DDP's all-reduce makes fast ranks wait inside backward for the slowest one, so step times
    match and the straggler has the *smallest* backward.  The gap is therefore measured on the
    phases DDP does not equalise; only when step times themselves differ (no per-step sync)
    does the step-time excess count, and then backward may be the cause.

    With ``step_comm`` in ``view``, a rank's *own* communication counts too: its exposed
    collective time over the other ranks' median, less the most any other rank's
    non-synchronised excess, or excess outside exposed collectives, could have made it wait
    there (the others wait for a compute straggler inside the all-reduce; the straggler itself
    waits least).  That excess is the cause "communication"; it is time spent inside some
    phase, so it is taken out of the phase with the largest excess rather than counted twice.
    The rest of a rank's exposed excess is waiting, and is taken out of its own gap.
    """
    if len(data.ranks) < 2:
        return None
    steps = data.common_steps()
    if len(steps) < th.MIN_STEPS:
        return None
    step_m = data.matrix("step", steps)
    timed = np.isfinite(step_m).all(axis=0)
    if int(timed.sum()) < th.MIN_STEPS:
        return None
    steps, step_m = steps[timed], step_m[:, timed]
    mats = {p: np.nan_to_num(data.matrix(p, steps)) for p in PHASES}
    typical_step = float(np.median(step_m))
    if typical_step <= 0:
        return None
    refs = {p: others_median(mats[p]) for p in PHASES}
    step_ref = others_median(step_m)
    all_deltas = [{p: _median_delta(mats[p][i], refs[p][i]) for p in PHASES} for i in range(len(data.ranks))]
    ne_gaps = [sum(max(0.0, d[p]) for p in NON_EQUALISED) for d in all_deltas]
    comm_m = _exposed_comm(view, data, steps)
    comm_deltas = [0.0] * len(data.ranks)
    own_comm = [0.0] * len(data.ranks)
    if comm_m is not None:
        comm_ref = others_median(comm_m)
        # a rank's time outside exposed collectives, over the others': what it can make them wait.
        # It covers what the phases miss: a slow backward before a manual all-reduce, or slowly
        # issued async collectives, are not in the non-equalised phases
        work = step_m - comm_m
        work_ref = others_median(work)
        holds = [max(ne_gaps[j], _median_delta(work[j], work_ref[j])) for j in range(len(data.ranks))]
        for i in range(len(data.ranks)):
            comm_deltas[i] = _median_delta(comm_m[i], comm_ref[i])
            waited = max((g for j, g in enumerate(holds) if j != i), default=0.0)
            excess = comm_deltas[i] - waited
            own_comm[i] = excess if excess >= th.STRAGGLER_COMM_MIN_GAP_US else 0.0
        # exposed time a rank spent waiting for another is not its own excess, in whichever
        # phase the collective ran (a manual all-reduce's wait lands in the residual)
        for i in range(len(data.ranks)):
            ne_gaps[i] = max(0.0, ne_gaps[i] - (max(0.0, comm_deltas[i]) - own_comm[i]))
    best: tuple[float, int, float] | None = None
    for i, _rank in enumerate(data.ranks):
        step_delta = _median_delta(step_m[i], step_ref[i])
        gap = max(ne_gaps[i], step_delta, own_comm[i])
        if best is None or gap > best[0]:
            best = (gap, i, step_delta)
    assert best is not None
    gap, i, step_delta = best
    deltas, ne_gap, comm = all_deltas[i], ne_gaps[i], own_comm[i]
    if gap < th.STRAGGLER_MIN_GAP_US:
        return None
    score = gap / typical_step
    severity = grade(score, th.STRAGGLER_WARN, th.STRAGGLER_CRITICAL, len(steps))
    if severity is None:
        return None
    culprit = data.ranks[i]
    synced = ne_gap >= step_delta  # steps equalised: the excess hides in backward of the others
    counted = NON_EQUALISED if synced else PHASES
    contrib = {p: max(0.0, deltas[p]) for p in counted}
    if comm > 0:
        # the collective was waited for inside some phase: move that much out of the largest one
        top = max(contrib, key=lambda p: contrib[p])
        contrib[top] = max(0.0, contrib[top] - comm)
        contrib[COMMUNICATION] = comm
    # shares of the gap (medians do not add up: what the phases do not explain stays unexplained)
    total = max(gap, sum(contrib.values())) or 1.0
    by_cause = {c: sum(contrib.get(p, 0.0) for p in ps) / total for c, ps in CAUSES.items()}
    by_cause[COMMUNICATION] = contrib.get(COMMUNICATION, 0.0) / total
    cause = max(by_cause, key=lambda c: by_cause[c])
    if by_cause[cause] < th.STRAGGLER_CAUSE_SHARE:
        cause = "mixed"
    top_phase = max(contrib, key=lambda p: contrib[p])
    backward = mats["backward"]
    culprit_bwd = float(np.median(backward[i]))
    others_bwd = float(np.median(np.delete(backward, i, axis=0)))
    evidence: dict[str, float | int | None] = {
        "score": score,
        "gap_us": gap,
        "step_median_us": typical_step,
        "steps_synchronised": int(synced),
        "culprit_backward_median_us": culprit_bwd,
        "others_backward_median_us": others_bwd,
        "cause_share": by_cause.get(cause, max(by_cause.values())),
        "warn_score": th.STRAGGLER_WARN,
        "critical_score": th.STRAGGLER_CRITICAL,
        "steps": len(steps),
        "ranks": len(data.ranks),
    }
    evidence.update({f"delta_{p}_us": deltas[p] for p in PHASES})
    if comm_m is not None:
        evidence["delta_comm_exposed_us"] = comm_deltas[i]
        evidence["own_comm_us"] = comm
    what = (
        "exposed collective time"
        if comm >= max(ne_gap, step_delta)
        else ("non-synchronised time" if synced else "step time")
    )
    text = (
        f"rank {culprit} is a straggler ({cause}): {ms(gap)} ({pct(score)} of a {ms(typical_step)} step) "
        f"more {what} per step than the other ranks, mostly {top_phase} (+{ms(contrib[top_phase])})"
    )
    if synced and culprit_bwd < others_bwd:
        text += f"; its backward is {ms(others_bwd - culprit_bwd)} shorter because the others wait for it there"
    return Finding(
        kind=STRAGGLER,
        severity=severity,
        rank=culprit,
        summary=text,
        evidence=evidence,
        labels={"cause": cause, "top_phase": top_phase},
    )
