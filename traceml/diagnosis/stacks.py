"""Where the residual goes: the stack sampler's ``step_stack`` rows turned into a profile, and the
rule that uses it (names the residual's top functions; INPUT_BOUND when it mostly reads data).

Pure: no clock, no I/O.  Names from a recording are bounded and stripped of control characters here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.findings import INPUT_BOUND, RESIDUAL_HEAVY, Finding
from traceml.store import StoreView
from traceml.views.steps import StepData

TABLE = "step_stack"
RESIDUAL_PHASE = -1
MAX_NAME = 96


def _clean(text: object) -> str:
    s = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return s if len(s) <= MAX_NAME else s[: MAX_NAME - 1] + "…"


@dataclass(frozen=True)
class StackEntry:
    func: str
    site: str
    samples: int
    share: float  # of the residual samples
    reads_data: bool

    @property
    def label(self) -> str:
        return f"{self.func} ({self.site})" if self.site else self.func

    def to_dict(self) -> dict[str, object]:
        return {
            "func": self.func,
            "site": self.site,
            "samples": self.samples,
            "share": round(self.share, 6),
            "reads_data": self.reads_data,
        }


@dataclass(frozen=True)
class ResidualProfile:
    samples: int  # residual samples in the window
    input_samples: int  # of which the stack was reading data
    top: tuple[StackEntry, ...]

    @property
    def input_share(self) -> float:
        return self.input_samples / self.samples if self.samples else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "input_samples": self.input_samples,
            "input_share": round(self.input_share, 6),
            "top": [e.to_dict() for e in self.top],
        }


def residual_profile(view: StoreView, data: StepData, top: int = 5) -> ResidualProfile | None:
    """The residual samples of the window's steps (None without ``step_stack`` rows there)."""
    if not view.has(TABLE) or data.empty:
        return None
    counts: dict[tuple[str, str], list[int]] = {}
    total = inputs = 0
    for r in data.ranks:
        rs = data.per_rank[r]
        if not len(rs.step) or view.rows(TABLE, r) == 0:
            continue
        cols = view.columns(TABLE, r)
        lo, hi = int(rs.step[0]), int(rs.step[-1])
        step = np.asarray(cols["step"], np.int64)
        first = np.asarray(cols["first_step"], np.int64)
        phase = np.asarray(cols["phase"], np.int64)
        keep = (phase == RESIDUAL_PHASE) & (step >= lo) & (first <= hi)
        samples = np.asarray(cols["samples"], np.int64)
        flags = np.asarray(cols["input"], np.int64)
        funcs, sites = cols["func"], cols["site"]
        for i in np.flatnonzero(keep):
            n = int(samples[i])
            if n <= 0:
                continue
            key = (_clean(funcs[i]), _clean(sites[i]))
            c = counts.setdefault(key, [0, 0])
            c[0] += n
            total += n
            if flags[i]:
                c[1] += n
                inputs += n
    if total == 0:
        return None
    ranked = sorted(counts.items(), key=lambda kv: -kv[1][0])[:top]
    entries = tuple(
        StackEntry(func, site, n, n / total, reads > n / 2) for (func, site), (n, reads) in ranked if func != "(other)"
    )
    return ResidualProfile(samples=total, input_samples=inputs, top=entries)


def _residual_share(data: StepData) -> float:
    shares = []
    for r in data.ranks:
        rs = data.per_rank[r]
        res, step = rs.phases["residual"], rs.step_us
        ok = np.isfinite(res) & np.isfinite(step) & (step > 0)
        if ok.any() and step[ok].sum() > 0:
            shares.append(float(res[ok].sum() / step[ok].sum()))
    return float(np.median(shares)) if shares else float("nan")


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def describe(profile: ResidualProfile, n: int = 2) -> str:
    """``get_batch (train.py:118) 91%, main (train.py:60) 5% of residual samples``."""
    parts = [f"{e.label} {_pct(e.share)}" for e in profile.top[:n]]
    return ", ".join(parts) + " of residual samples" if parts else ""


def explain_residual(view: StoreView, data: StepData, findings: Sequence[Finding]) -> list[Finding]:
    """``findings`` with the residual named, and an input-bound verdict where the residual reads data."""
    profile = residual_profile(view, data)
    out = list(findings)
    if profile is None or profile.samples < th.STACK_MIN_SAMPLES:
        return out
    residual = _residual_share(data)
    if not np.isfinite(residual):
        return out
    where = describe(profile)
    top = profile.top[0] if profile.top else None
    stack_evidence: dict[str, float | int | None] = {
        "residual_share": residual,
        "residual_samples": profile.samples,
        "residual_input_share": profile.input_share,
    }
    input_est = residual * profile.input_share
    steps = data.min_rank_steps()
    reader = next((e for e in profile.top if e.reads_data), top)
    if profile.input_share >= th.STACK_INPUT_SHARE and input_est >= th.INPUT_WARN and reader is not None:
        critical = input_est >= th.INPUT_CRITICAL and steps >= th.MIN_STEPS_CRITICAL
        existing = next((f for f in out if f.kind == INPUT_BOUND), None)
        if existing is None or float(existing.evidence.get("share") or 0.0) < input_est:
            if existing is not None:
                out.remove(existing)
            out.append(
                Finding(
                    kind=INPUT_BOUND,
                    severity="critical" if critical else "warn",
                    rank=data.ranks[0] if len(data.ranks) == 1 else None,
                    summary=(
                        f"input-bound: {reader.label} reads data in {_pct(profile.input_share)} of the residual "
                        f"samples, about {_pct(input_est)} of step time (not a DataLoader: mark it with "
                        f"traceml.trace_input to time it exactly)"
                    ),
                    evidence={
                        **stack_evidence,
                        "share": input_est,
                        "warn_share": th.INPUT_WARN,
                        "critical_share": th.INPUT_CRITICAL,
                        "steps": steps,
                    },
                    labels={"source": "stack", "function": reader.func, "site": reader.site},
                )
            )
        if residual * (1 - profile.input_share) < th.RESIDUAL_WARN:
            out = [f for f in out if f.kind != RESIDUAL_HEAVY]
    for i, f in enumerate(out):
        if f.kind == RESIDUAL_HEAVY and where:
            out[i] = dataclasses.replace(
                f,
                summary=f"{f.summary}; residual {_pct(residual)} of the step: {where}",
                evidence={**f.evidence, **stack_evidence},
                labels={**f.labels, **({"function": top.func, "site": top.site} if top else {})},
            )
    return out
