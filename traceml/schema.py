"""Table schemas: the names and column types every room agrees on.

A leaf: imports nothing of traceml but the error tree and the name policy.  Type codes and conventions:
docs/internals.md, "Data model".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from traceml import names
from traceml.errors import ConfigError

#: numpy dtype (little-endian) for every numeric type code; ``str`` maps to object.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "i8": np.dtype("<i8"),
    "i4": np.dtype("<i4"),
    "u1": np.dtype("u1"),
    "f8": np.dtype("<f8"),
    "f4": np.dtype("<f4"),
}
STR = "str"
TYPE_CODES: frozenset[str] = frozenset([*NUMPY_DTYPES, STR])

#: the value that means "not measured" for each type code
MISSING: dict[str, Any] = {"i8": -1, "i4": -1, "u1": 0, "f8": float("nan"), "f4": float("nan"), "str": ""}


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str


@dataclass(frozen=True)
class TableSchema:
    """An ordered list of typed columns under a table name."""

    name: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "columns": [[c.name, c.dtype] for c in self.columns]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableSchema:
        try:
            name = str(data["name"])
            cols = tuple(Column(str(n), str(t)) for n, t in data["columns"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"table schema must be {{'name': str, 'columns': [[name, dtype], ...]}}; found {data!r:.200}"
            ) from exc
        for c in cols:
            if c.dtype not in TYPE_CODES:
                raise ConfigError(f"column {name}.{c.name} has type {c.dtype!r}; expected one of {sorted(TYPE_CODES)}")
        return cls(name, cols)


def table(name: str, *cols: tuple[str, str]) -> TableSchema:
    return TableSchema(name, tuple(Column(n, t) for n, t in cols))


# --- the standard tables -------------------------------------------------------------

#: The phases of a step, in display order.  ``<phase>_us`` columns of STEP_TIME.
PHASES: tuple[str, ...] = ("dataloader", "h2d", "forward", "backward", "optimizer", "residual")
#: Phases timed on the GPU clock too (STEP_GPU).
GPU_PHASES: tuple[str, ...] = ("h2d", "forward", "backward", "optimizer", "step")

#: One row per step per rank, appended at the end of the step (CPU wall clock).
#: ``step_us`` = dataloader wait since the previous step + the traced body;
#: ``residual_us`` = step_us minus the other phases (>= 0).  ``failed`` = 1 when the body raised.
STEP_TIME = table(
    "step_time",
    ("step", "i8"),
    ("ts_ns", "i8"),
    ("failed", "u1"),
    ("step_us", "i8"),
    *((f"{p}_us", "i8") for p in PHASES),
)

#: Where each phase of a step ran, stored compactly as gaps: ``<phase>_gap_us`` is the time from
#: the end of the previous phase *in this order* (dataloader, h2d, forward, backward, optimizer)
#: that ran in the step -- or from the step's start for the first one -- to the phase's first
#: start; negative when it started earlier (a fetch inside the step after the forward).  A phase
#: that did not run (``<phase>_us`` = 0 in STEP_TIME) has 0.  :func:`phase_starts` turns the gaps
#: back into start offsets.  The step of the same ``step`` in STEP_TIME ends at its ``ts_ns`` and
#: began ``step_us`` earlier.  Absent from recordings written before it existed.
TIMELINE_PHASES: tuple[str, ...] = PHASES[:-1]
STEP_TIMELINE = table("step_timeline", ("step", "i8"), *((f"{p}_gap_us", "i8") for p in TIMELINE_PHASES))


def phase_gaps(durations_us: Sequence[Any], starts_us: Sequence[Any]) -> list[Any]:
    """Start offsets (µs from the step's start, < 0 = did not run) -> STEP_TIMELINE gaps, per
    phase of TIMELINE_PHASES; works on numbers or on numpy arrays (column-wise)."""
    gaps = []
    end: Any = 0
    for dur, start in zip(durations_us, starts_us, strict=True):
        ran = (start >= 0) & (dur > 0)
        gaps.append(np.where(ran, start - end, 0) if isinstance(ran, np.ndarray) else (start - end if ran else 0))
        end = np.where(ran, start + dur, end) if isinstance(ran, np.ndarray) else (start + dur if ran else end)
    return gaps


def phase_starts(durations_us: Sequence[Any], gaps_us: Sequence[Any]) -> list[Any]:
    """The inverse of :func:`phase_gaps`: start offsets, -1 for a phase that did not run."""
    starts = []
    end: Any = 0
    for dur, gap in zip(durations_us, gaps_us, strict=True):
        ran = dur > 0
        start = end + gap
        starts.append(np.where(ran, start, -1) if isinstance(ran, np.ndarray) else (start if ran else -1))
        end = np.where(ran, start + dur, end) if isinstance(ran, np.ndarray) else (start + dur if ran else end)
    return starts


#: GPU time per phase from CUDA events, appended when the events resolve (later than STEP_TIME).
STEP_GPU = table("step_gpu", ("step", "i8"), ("ts_ns", "i8"), *((f"{p}_gpu_us", "i8") for p in GPU_PHASES))

#: User-named regions (``traceml.trace_time``) per step: total CPU time and call count.
#: ``start_us``: the region's first start from the step's start (-1 outside a step, or in files
#: written before 1.2).
STEP_REGION = table(
    "step_region",
    ("step", "i8"),
    ("ts_ns", "i8"),
    ("name", "str"),
    ("cpu_us", "i8"),
    ("calls", "i4"),
    ("start_us", "i8"),
)

#: Per-step CUDA memory peaks (peak stats reset at step start).  Absent on CPU.
STEP_MEMORY = table(
    "step_memory", ("step", "i8"), ("ts_ns", "i8"), ("peak_alloc_bytes", "i8"), ("peak_reserved_bytes", "i8")
)

#: Per-rank process sample (~1 Hz, background thread).  GPU columns -1 without CUDA.
PROCESS = table(
    "process",
    ("ts_ns", "i8"),
    ("cpu_pct", "f4"),
    ("rss_bytes", "i8"),
    ("threads", "i4"),
    ("fds", "i4"),
    ("gpu_alloc_bytes", "i8"),
    ("gpu_reserved_bytes", "i8"),
    ("gpu_total_bytes", "i8"),
)

#: Per-node system sample, from local rank 0 only.
SYSTEM = table(
    "system",
    ("ts_ns", "i8"),
    ("node_rank", "i4"),
    ("cpu_pct", "f4"),
    ("ram_used_bytes", "i8"),
    ("ram_total_bytes", "i8"),
)

#: Per-GPU system sample via NVML, from local rank 0 only; absent without NVML.
SYSTEM_GPU = table(
    "system_gpu",
    ("ts_ns", "i8"),
    ("node_rank", "i4"),
    ("gpu_idx", "i4"),
    ("util_pct", "f4"),
    ("mem_used_bytes", "i8"),
    ("mem_total_bytes", "i8"),
    ("temp_c", "f4"),
    ("power_w", "f4"),
    ("power_limit_w", "f4"),
)

#: What traceml itself costs this rank, cumulative since the agent started (one row per sampler
#: tick).  ``steps``: steps so far; ``sampled_steps`` of them measured traceml's own time on the
#: training thread, ``sampled_ns`` in total; ``threads_cpu_ns``: traceml's time outside the sampled
#: steps -- the CPU time of its sampler, sender and stack threads, the native stack samples and the
#: host memory steps' slow exits on the training thread (no sampled step is one of those).
#: Per step: ``sampled_ns / sampled_steps + threads_cpu_ns / steps``.
TRACEML_COST = table(
    "traceml_cost",
    ("ts_ns", "i8"),
    ("steps", "i8"),
    ("sampled_steps", "i8"),
    ("sampled_ns", "i8"),
    ("threads_cpu_ns", "i8"),
)

#: Where the training thread's time goes, from the stack sampler (``traceml.runtime.stacks``): per
#: window of steps ``first_step..step`` and per ``phase`` (-1: no named phase, the residual; else the
#: index into PHASES), the top functions of the user's code (``func`` qualname, ``site`` file:line of
#: its def, ``samples`` taken in it; ``input``: its stack was reading data) and ``window_samples``,
#: every sample of the window.  ``func`` "(other)" sums the rest of the phase.
STEP_STACK = table(
    "step_stack",
    ("step", "i8"),
    ("ts_ns", "i8"),
    ("first_step", "i8"),
    ("phase", "i4"),
    ("func", "str"),
    ("site", "str"),
    ("samples", "i4"),
    ("input", "u1"),
    ("window_samples", "i4"),
)

#: DDP's gradient all-reduce per step (``traceml.runtime.comm``): ``comm_us`` the union of the buckets'
#: launch-to-completion intervals, ``exposed_us`` the last bucket's launch to the last completion (the
#: part no compute is left to hide), ``buckets`` timed.  Only for DDP models.
STEP_COMM = table(
    "step_comm", ("step", "i8"), ("ts_ns", "i8"), ("comm_us", "i8"), ("exposed_us", "i8"), ("buckets", "i4")
)

#: Host resident memory every few steps (``traceml.runtime.hostmem``; CPU runs on Linux): a leak
#: per step shows on short runs.
STEP_HOST = table("step_host", ("step", "i8"), ("ts_ns", "i8"), ("rss_bytes", "i8"))

STANDARD_TABLES: dict[str, TableSchema] = {
    t.name: t
    for t in (
        STEP_TIME,
        STEP_TIMELINE,
        STEP_GPU,
        STEP_REGION,
        STEP_MEMORY,
        PROCESS,
        SYSTEM,
        SYSTEM_GPU,
        TRACEML_COST,
        STEP_STACK,
        STEP_COMM,
        STEP_HOST,
    )
}


# --- rows <-> columns ---------------------------------------------------------------


def rows_to_columns(schema: TableSchema, rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Turn tuple rows (column order) into ``{name: numpy array | list[str]}``.

    Rows may stop short of the last columns (columns a table gained later, e.g. STEP_REGION's
    ``start_us``): those get the "not measured" value."""
    if not rows:
        return {c.name: ([] if c.dtype == STR else np.empty(0, NUMPY_DTYPES[c.dtype])) for c in schema.columns}
    cols: list[Sequence[Any]] = list(zip(*rows, strict=True))
    for col in schema.columns[len(cols) :]:
        cols.append([MISSING[col.dtype]] * len(rows))
    out: dict[str, Any] = {}
    for col, values in zip(schema.columns, cols, strict=True):
        if col.dtype == STR:
            out[col.name] = [str(v) for v in values]
        else:
            out[col.name] = np.asarray(values, dtype=NUMPY_DTYPES[col.dtype])
    return out


def empty_columns(schema: TableSchema) -> dict[str, Any]:
    return rows_to_columns(schema, [])


def column_length(columns: Mapping[str, Any]) -> int:
    """Row count of a column dict; raises if columns disagree."""
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ConfigError(f"columns have different lengths {sorted(lengths)}; expected one length")
    return lengths.pop() if lengths else 0


def schema_from_columns(name: str, columns: Mapping[str, Any]) -> TableSchema:
    """Infer a schema from arrays (used for tables not in STANDARD_TABLES)."""
    cols = []
    for cname, values in columns.items():
        if isinstance(values, np.ndarray):
            code = next((k for k, d in NUMPY_DTYPES.items() if d == values.dtype.newbyteorder("<")), None)
            if code is None:
                raise ConfigError(
                    f"column {name}.{cname} has numpy dtype {values.dtype}; expected one of i8 i4 u1 f8 f4"
                )
            cols.append(Column(cname, code))
        else:
            cols.append(Column(cname, STR))
    return TableSchema(name, tuple(cols))


def iter_standard_schemas() -> Iterable[TableSchema]:
    return STANDARD_TABLES.values()


# --- rollups ---------------------------------------------------------------------------
# A table with an integer ``step`` column (and no str column) has a *rollup*: one row per group
# of consecutive rows of one rank in the same ``step // bucket_steps`` (the math lives in
# traceml/format/rollup.py; spec: docs/format.md, "Rollup tables").

ROLLUP_PREFIX = names.ROLLUP_PREFIX
ROLLUP_STEP, ROLLUP_STEP_LAST, ROLLUP_ROWS = "step", "step_last", "rows"


def rollup_name(table: str) -> str:
    """``step_time`` -> ``rollup/step_time``."""
    return ROLLUP_PREFIX + table


def is_rollup(table: str) -> bool:
    return table.startswith(ROLLUP_PREFIX)


def rollup_statistics(column: Column) -> tuple[str, ...]:
    """What a rollup keeps of *column*: ``*_ns`` timestamps min and max, every other number also its sum."""
    return ("min", "max") if column.name.endswith("_ns") else ("sum", "min", "max")


def rollup_schema(schema: TableSchema) -> TableSchema | None:
    """The rollup table of *schema*: ``step`` (first), ``step_last``, ``rows``, then
    ``<column>.<statistic>`` (sums as f8, min/max in the column's type); None when the table has
    no integer ``step``, has a str column (rows of one step that mean different things), or is a rollup."""
    if is_rollup(schema.name):
        return None
    kinds = {c.name: c.dtype for c in schema.columns}
    if kinds.get(ROLLUP_STEP) not in ("i8", "i4") or STR in kinds.values():
        return None
    cols = [Column(ROLLUP_STEP, "i8"), Column(ROLLUP_STEP_LAST, "i8"), Column(ROLLUP_ROWS, "i8")]
    for c in schema.columns:
        if c.name == ROLLUP_STEP:
            continue
        for stat in rollup_statistics(c):
            cols.append(Column(f"{c.name}.{stat}", "f8" if stat == "sum" else c.dtype))
    return TableSchema(rollup_name(schema.name), tuple(cols))
