"""Rollups: per-step tables summarised in groups of steps, so a long run draws without reading every row.

Writer and reader use the same :func:`summarize`, so they always agree (spec: docs/format.md, "Rollup
tables").  Pure functions over numpy columns: no I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from traceml.schema import (
    NUMPY_DTYPES,
    ROLLUP_ROWS,
    ROLLUP_STEP,
    ROLLUP_STEP_LAST,
    TableSchema,
    rollup_schema,
    rollup_statistics,
)

STEP, STEP_LAST, ROWS = ROLLUP_STEP, ROLLUP_STEP_LAST, ROLLUP_ROWS

#: steps per rollup group unless the writer is told otherwise (1 M steps -> ~3 900 rows per rank)
DEFAULT_ROLLUP_STEPS = 256
#: a group whose step does not advance (the same step appended again and again) closes at this many rows
MAX_GROUP_ROWS_FACTOR = 4

Columns = Mapping[str, np.ndarray]


def group_starts(steps: np.ndarray, bucket_steps: int) -> np.ndarray:
    """Row indices where a group begins: the first row, and wherever ``step // bucket_steps``
    changes or a group reached ``MAX_GROUP_ROWS_FACTOR * bucket_steps`` rows."""
    n = len(steps)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    buckets = np.floor_divide(steps.astype(np.int64, copy=False), bucket_steps)
    starts = np.concatenate(([0], np.flatnonzero(buckets[1:] != buckets[:-1]) + 1))
    cap = MAX_GROUP_ROWS_FACTOR * bucket_steps
    lengths = np.diff(np.append(starts, n))
    if lengths.max() <= cap:
        return starts
    split = [np.arange(s, s + length, cap) for s, length in zip(starts.tolist(), lengths.tolist(), strict=True)]
    return np.concatenate(split)


def summarize(schema: TableSchema, cols: Columns, starts: np.ndarray) -> dict[str, np.ndarray]:
    """One rollup row per group of *cols* (rows of one rank of the table *schema*) beginning at *starts*."""
    rolled = _rolled(schema)
    n = len(cols[STEP])
    if n == 0:
        return {c.name: np.empty(0, NUMPY_DTYPES[c.dtype]) for c in rolled.columns}
    ends = np.append(starts[1:], n)
    steps = np.asarray(cols[STEP])
    out: dict[str, np.ndarray] = {
        STEP: np.minimum.reduceat(steps, starts).astype(np.int64, copy=False),
        STEP_LAST: np.maximum.reduceat(steps, starts).astype(np.int64, copy=False),
        ROWS: (ends - starts).astype(np.int64),
    }
    for c in schema.columns:
        if c.name == STEP:
            continue
        values = np.asarray(cols[c.name])
        for stat in rollup_statistics(c):
            if stat == "sum":  # accumulated in float64: no copy; sums past 1.8e308 are inf, as they should
                with np.errstate(over="ignore", invalid="ignore"):
                    out[f"{c.name}.sum"] = np.add.reduceat(values, starts, dtype=np.float64)
            elif stat == "min":
                out[f"{c.name}.min"] = np.minimum.reduceat(values, starts)
            else:
                out[f"{c.name}.max"] = np.maximum.reduceat(values, starts)
    return out


@functools.lru_cache(maxsize=256)
def _rolled(schema: TableSchema) -> TableSchema:
    rolled = rollup_schema(schema)
    if rolled is None:
        raise ValueError(f"table {schema.name!r} has no rollup")
    return rolled


def rollup(schema: TableSchema, cols: Columns, bucket_steps: int = DEFAULT_ROLLUP_STEPS) -> dict[str, np.ndarray]:
    """Every group of *cols* (rows of one rank, in the order they were appended) as rollup rows."""
    return summarize(schema, cols, group_starts(np.asarray(cols[STEP]), bucket_steps))


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p and len(p[STEP])]
    if not parts:
        return {}
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class RollupBuffer:
    """The writer's side: the rows of one (rank, table) stream not rolled up yet.

    :meth:`add` only keeps the rows (it runs on every append); :meth:`drain` — the writer calls
    it when it closes a segment, so the rows held stay within a segment's worth — rolls up the
    groups they completed and keeps the open one; :meth:`flush` closes that one too (at the end
    of a recording).
    """

    __slots__ = ("schema", "bucket_steps", "_chunks")

    def __init__(self, schema: TableSchema, bucket_steps: int) -> None:
        self.schema = schema
        self.bucket_steps = bucket_steps
        self._chunks: list[Columns] = []

    def add(self, cols: Columns) -> None:
        """Keep *cols* (arrays the caller will not change)."""
        self._chunks.append(cols)

    def _merged(self) -> dict[str, np.ndarray] | None:
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return None
        names = [c.name for c in self.schema.columns]
        if len(chunks) == 1:
            return {k: np.asarray(chunks[0][k]) for k in names}
        return {k: np.concatenate([np.asarray(c[k]) for c in chunks]) for k in names}

    def drain(self) -> dict[str, np.ndarray] | None:
        """The rollup rows of the groups completed so far; the open group's rows are kept."""
        merged = self._merged()
        if merged is None or not len(merged[STEP]):
            return None
        starts = group_starts(merged[STEP], self.bucket_steps)
        last = int(starts[-1])
        self._chunks = [{k: v[last:].copy() for k, v in merged.items()}]  # a copy frees the merged arrays
        if last == 0:
            return None
        return summarize(self.schema, {k: v[:last] for k, v in merged.items()}, starts[:-1])

    def flush(self) -> dict[str, np.ndarray] | None:
        """The rollup rows of every row kept, the open group included."""
        merged = self._merged()
        if merged is None or not len(merged[STEP]):
            return None
        return rollup(self.schema, merged, self.bucket_steps)
