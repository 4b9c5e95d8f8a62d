"""What a diagnosis says: findings with a severity, the culprit rank and the numbers behind them.

Every type here is frozen and converts to plain JSON/msgpack-able dicts (``to_dict``), so the
same object is shown live, written into ``summary.json`` and embedded in a ``.tml``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warn", "critical"]

SEVERITIES: tuple[Severity, ...] = ("info", "warn", "critical")
_SEVERITY_ORDER: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}

INPUT_BOUND = "INPUT_BOUND"
H2D_BOUND = "H2D_BOUND"
COMMUNICATION_BOUND = "COMMUNICATION_BOUND"
MEMORY_PRESSURE = "MEMORY_PRESSURE"
MEMORY_IMBALANCE = "MEMORY_IMBALANCE"
HOST_SATURATION = "HOST_SATURATION"
GPU_THERMAL = "GPU_THERMAL"
COMPUTE_BOUND = "COMPUTE_BOUND"
RESIDUAL_HEAVY = "RESIDUAL_HEAVY"
REGION_HEAVY = "REGION_HEAVY"
STRAGGLER = "STRAGGLER"
MEMORY_CREEP = "MEMORY_CREEP"
LOW_GPU_UTILIZATION = "LOW_GPU_UTILIZATION"
HEALTHY = "HEALTHY"
INSUFFICIENT_DATA = "INSUFFICIENT_DATA"

#: Every finding kind, in the order that breaks ties between findings of equal severity when
#: the primary diagnosis is chosen (a straggler explains a job-wide input share, not the reverse).
KINDS: tuple[str, ...] = (
    STRAGGLER,
    INPUT_BOUND,
    H2D_BOUND,
    COMMUNICATION_BOUND,
    REGION_HEAVY,
    RESIDUAL_HEAVY,
    MEMORY_PRESSURE,
    MEMORY_CREEP,
    MEMORY_IMBALANCE,
    HOST_SATURATION,
    GPU_THERMAL,
    LOW_GPU_UTILIZATION,
    INSUFFICIENT_DATA,
    COMPUTE_BOUND,
    HEALTHY,
)
_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}


def severity_rank(severity: str) -> int:
    """0 for info, 1 for warn, 2 for critical."""
    return _SEVERITY_ORDER[severity]


def clean_number(value: Any) -> float | int | None:
    """A JSON-safe number: integers stay integers, NaN/inf become None, floats keep 6 decimals."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    f = float(value)
    if not math.isfinite(f):
        return None
    return round(f, 6)


@dataclass(frozen=True)
class Finding:
    """One classified observation about the run.

    ``summary`` is one human line with the numbers; ``evidence`` holds those numbers (and
    more) by name; ``labels`` holds the few categorical facts (a straggler's cause, a memory
    source, an early or confirmed creep).  ``rank`` is the culprit rank where one applies.
    """

    kind: str
    severity: Severity
    rank: int | None
    summary: str
    evidence: Mapping[str, float | int | None] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def sort_key(self) -> tuple[int, int]:
        return (-severity_rank(self.severity), _KIND_ORDER.get(self.kind, len(_KIND_ORDER)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "rank": self.rank,
            "summary": self.summary,
            "evidence": {str(k): clean_number(v) for k, v in self.evidence.items()},
            "labels": {str(k): str(v) for k, v in self.labels.items()},
        }


@dataclass(frozen=True)
class Window:
    """Which steps a diagnosis looked at, and what it left out on purpose."""

    first_step: int | None
    last_step: int | None
    steps: int  # distinct step numbers analysed
    ranks: tuple[int, ...]
    warmup_steps: int  # distinct step numbers skipped as warm-up
    failed_rows: int  # (rank, step) rows skipped because the step body raised
    last_n: int | None  # the requested trailing window; None = whole run
    start_ns: int | None
    end_ns: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_step": self.first_step,
            "last_step": self.last_step,
            "steps": self.steps,
            "ranks": list(self.ranks),
            "warmup_steps": self.warmup_steps,
            "failed_rows": self.failed_rows,
            "last_n": self.last_n,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
        }


@dataclass(frozen=True)
class Diagnosis:
    """The primary diagnosis, every finding (primary included, most severe first), the window,
    and the signals that were missing so some rules could not run."""

    primary: Finding
    findings: list[Finding]
    window: Window
    missing: tuple[str, ...] = ()

    def by_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "primary": self.primary.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "window": self.window.to_dict(),
            "missing": list(self.missing),
        }
