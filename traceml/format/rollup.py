"""Rollups: per-step tables summarised in groups of steps, so a long run draws without reading every row.

A *rollup* of a table with a ``step`` column holds one row per *group*: consecutive rows of one
rank whose ``step // bucket_steps`` is the same (spec: docs/format.md, "Rollup tables").  Each
group row keeps the row count, the first and last step, and the sum, min and max of every
numeric column (``*_ns`` timestamps: min and max only).  Means are exact (sum / rows), and so
are envelopes; quantiles are not kept.

The names (``rollup/<table>``, ``<column>.sum`` ...) are in :mod:`traceml.schema`, which every
room shares.  The writer appends rollup rows as the table ``rollup/<table>``; a reader rolls up whatever
raw rows the stored rollup does not cover yet (a crashed writer's tail) with the same
:func:`summarize`, so the two always agree.  Pure functions over numpy columns: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from traceml.schema import NUMPY_DTYPES, ROLLUP_ROWS, ROLLUP_STEP, ROLLUP_STEP_LAST, TableSchema, rollup_statistics

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
    n = len(cols[STEP])
    ends = np.append(starts[1:], n)
    steps = cols[STEP].astype(np.int64, copy=False)
    out: dict[str, np.ndarray] = {
        STEP: np.minimum.reduceat(steps, starts) if n else np.empty(0, np.int64),
        STEP_LAST: np.maximum.reduceat(steps, starts) if n else np.empty(0, np.int64),
        ROWS: (ends - starts).astype(np.int64),
    }
    for c in schema.columns:
        if c.name == STEP:
            continue
        values = cols[c.name]
        dtype = NUMPY_DTYPES[c.dtype]
        for stat in rollup_statistics(c):
            key = f"{c.name}.{stat}"
            if not n:
                out[key] = np.empty(0, np.float64 if stat == "sum" else dtype)
            elif stat == "sum":
                out[key] = np.add.reduceat(values.astype(np.float64), starts)
            elif stat == "min":
                out[key] = np.minimum.reduceat(values, starts).astype(dtype, copy=False)
            else:
                out[key] = np.maximum.reduceat(values, starts).astype(dtype, copy=False)
    return out


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
    """The writer's side: rows of one (rank, table) stream whose group is still open.

    :meth:`add` takes newly appended rows and returns the rollup rows of the groups they
    completed; :meth:`flush` closes the open group (at the end of a recording).
    """

    __slots__ = ("schema", "bucket_steps", "_open")

    def __init__(self, schema: TableSchema, bucket_steps: int) -> None:
        self.schema = schema
        self.bucket_steps = bucket_steps
        self._open: dict[str, np.ndarray] | None = None

    def add(self, cols: Columns) -> dict[str, np.ndarray] | None:
        names = [c.name for c in self.schema.columns]
        if self._open is not None:
            merged = {k: np.concatenate([self._open[k], np.asarray(cols[k])]) for k in names}
        else:
            merged = {k: np.asarray(cols[k]) for k in names}
        starts = group_starts(merged[STEP], self.bucket_steps)
        if not len(starts):
            return None
        last = int(starts[-1])
        self._open = {k: v[last:].copy() for k, v in merged.items()}
        if last == 0:
            return None
        done = {k: v[:last] for k, v in merged.items()}
        return summarize(self.schema, done, starts[:-1])

    def flush(self) -> dict[str, np.ndarray] | None:
        if self._open is None or not len(self._open[STEP]):
            return None
        rows, self._open = self._open, None
        return rollup(self.schema, rows, self.bucket_steps)

    @property
    def open_rows(self) -> int:
        return 0 if self._open is None else len(self._open[STEP])
