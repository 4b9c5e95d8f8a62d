"""What ``traceml inspect`` and ``verify`` report about a recording: per-table statistics of
the rows that decoded, and the whole-file report.  Pure: the reader does the reading."""

from __future__ import annotations

from typing import Any

import numpy as np

from traceml.schema import is_rollup

#: one decoded batch: (rank, table, columns)
Batch = tuple[int, str, dict[str, np.ndarray]]


class TableStats:
    """Per-table ``rows``, ``ranks``, ``step_min/max`` and ``t_min/max`` of the batches seen."""

    def __init__(self) -> None:
        self._stats: dict[str, dict[str, Any]] = {}

    def account(self, batches: list[Batch]) -> None:
        for rank, table, cols in batches:
            entry = self._stats.setdefault(
                table, {"rows": 0, "ranks": set(), "step_min": None, "step_max": None, "t_min": None, "t_max": None}
            )
            n = len(next(iter(cols.values()))) if cols else 0
            entry["rows"] += n
            entry["ranks"].add(rank)
            for col, lo, hi in (("step", "step_min", "step_max"), ("ts_ns", "t_min", "t_max")):
                if n and col in cols and cols[col].dtype.kind in "iu":
                    low, high = int(cols[col].min()), int(cols[col].max())
                    entry[lo] = low if entry[lo] is None else min(entry[lo], low)
                    entry[hi] = high if entry[hi] is None else max(entry[hi], high)

    def result(self) -> dict[str, dict[str, Any]]:
        for entry in self._stats.values():
            entry["ranks"] = sorted(entry["ranks"])
        return self._stats


def inspect_report(reader: Any, stats: dict[str, dict[str, Any]], *, file_bytes: int, sync: bytes) -> dict[str, Any]:
    """Everything ``traceml inspect --json`` prints, from ``verify``'s statistics.

    ``reader`` is the :class:`~traceml.format.reader.TmlReader` (not imported here: the reader
    imports this module, and the import graph stays acyclic).
    """
    segments = reader.segments
    schemas = reader.schemas
    rows = sum(n for seg in segments for (_, t), n in seg.rows.items() if not is_rollup(t))
    raw = sum(seg.raw_size for seg in segments)
    stored = sum(seg.length for seg in segments)
    rollups = {
        name: {"rows": stats[name]["rows"], "ranks": stats[name]["ranks"]} for name in sorted(stats) if is_rollup(name)
    }
    tables: dict[str, Any] = {}
    for name in sorted({t for t in stats if not is_rollup(t)} | set(reader.tables)):
        schema = schemas.get(name)
        entry = stats.get(name) or {"rows": 0, "ranks": []}
        tables[name] = {
            "rows": entry["rows"],
            "ranks": entry["ranks"],
            "step_min": entry.get("step_min"),
            "step_max": entry.get("step_max"),
            "t_min": entry.get("t_min"),
            "t_max": entry.get("t_max"),
            "columns": [[c.name, c.dtype] for c in schema.columns] if schema else [],
        }
    header = {k: v for k, v in reader.header.items() if k not in ("sync", "schemas")}
    header["sync"] = sync.hex()
    return {
        "path": str(reader.path),
        "file_bytes": file_bytes,
        "header": header,
        "ranks": reader.ranks,
        "tables": tables,
        "rollups": {"steps": reader.rollup_steps, "tables": rollups},
        "segments": {
            "count": len(segments),
            "rows": rows,
            "raw_bytes": raw,
            "stored_bytes": stored,
            "compression_ratio": round(raw / stored, 3) if stored else None,
            "bytes_per_row": round(file_bytes / rows, 3) if rows else None,
        },
        "attachments": sorted(reader.attachments),
        "summary": reader.summary,
        "integrity": reader.integrity,
    }
