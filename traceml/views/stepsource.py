"""The step-source interface: what the step views (:mod:`traceml.views.series`) read of a run's steps,
whatever holds them (raw rows, a rollup still loading, ...).

Every figure a source answers is about the ranks and step range it was built for; durations in us.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from traceml.views.select import StepRange

if TYPE_CHECKING:
    from traceml.views.measures import JobMeasures


@dataclass(frozen=True)
class StepGrid:
    """``n`` equal step buckets of ``width`` steps from step ``lo``."""

    lo: int
    width: int
    n: int

    @property
    def centres(self) -> np.ndarray:
        """Each bucket's middle step (float)."""
        return self.lo + np.arange(self.n, dtype=np.float64) * self.width + (self.width - 1) / 2.0


def bucket_width(lo: int, hi: int, max_buckets: int) -> int:
    """The width of equal step buckets that cover ``lo .. hi`` in at most ``max_buckets``."""
    return max(1, math.ceil((hi - lo + 1) / max(1, max_buckets)))


@dataclass(frozen=True)
class JobFigures:
    """The run-level figures of the chosen steps (:mod:`traceml.views.measures`); nan / None
    where the source cannot know them."""

    median_ms: float = math.nan
    p95_ms: float = math.nan
    slowest_rank: int | None = None
    skew_pct: float = math.nan
    steps_per_s: float = math.nan
    outside_share: float = math.nan

    @classmethod
    def of(cls, m: JobMeasures) -> JobFigures:
        """The figures of a :class:`~traceml.views.measures.JobMeasures`."""
        return cls(
            m.median_step_us / 1000.0,
            m.p95_step_us / 1000.0,
            m.slowest_rank if m.slowest_rank >= 0 else None,
            m.skew_pct,
            m.throughput_steps_per_s,
            m.outside_share,
        )


@runtime_checkable
class StepSource(Protocol):
    """The steps of the chosen ranks within the step range."""

    @property
    def exact(self) -> bool:
        """False when medians and quantiles are not known exactly (e.g. drawn from a rollup)."""

    @property
    def chosen(self) -> tuple[int, ...]:
        """The selected ranks that hold the step table (with or without steps in the range)."""

    def per_rank(self) -> tuple[int, ...]:
        """The chosen ranks with at least one step in the range, in rank order."""

    def span(self) -> StepRange | None:
        """The first and last step held over :meth:`per_rank`; None when there is none."""

    def grid(self, max_buckets: int) -> StepGrid:
        """Equal step buckets over :meth:`span`, about ``max_buckets`` of them (needs a step)."""

    def bucket_sums(
        self, rank: int, grid: StepGrid, columns: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The rank's steps per bucket and, per ``columns`` name it holds (``step_us``, ``forward_us``,
        ...), their us summed per bucket; a column the source does not hold is left out."""

    def region_sums(self, grid: StepGrid) -> dict[str, np.ndarray]:
        """Per bucket, the us of each named region outside the standard phases (summed over the
        ranks); empty when the source has no regions."""

    def line(self, rank: int, max_points: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The rank's step time line: ``(step, us, steps it stands for)``, at most ``max_points`` points."""

    def count(self, rank: int) -> int:
        """How many steps the rank has in the range (failed ones too)."""

    def quantiles(self, rank: int, qs: Sequence[float]) -> list[float]:
        """The rank's step time quantiles (us) over its steps that did not fail; nan when unknown."""

    def mean_ms(self, rank: int) -> float:
        """The rank's mean step time (ms)."""

    def figures(self) -> JobFigures:
        """The job's median, p95, slowest rank, skew, throughput and outside share."""

    def time_span(self) -> tuple[int, int] | None:
        """``(start, end)`` ns of the steps held: from the first step's start to the last one's end."""

    def completions(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The rank's step completion times (ns, sorted) and how many steps completed at each."""

    def latest_ns(self) -> int:
        """The latest time the source knows of (0 when none)."""
