"""The read-only store view: the one seam between capture and presentation.

Views, diagnosis and renderers take only :class:`StoreView`, never knowing whether live or replay filled it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traceml.schema import STANDARD_TABLES, TableSchema, empty_columns

#: ``StoreView.meta`` keys the aggregator (or replay) sets and the views read
META_RUN_NAME = "run_name"
META_START_NS = "start_ns"
META_EXPECTED_RANKS = "expected_ranks"
META_STATUS = "status"  # "starting" | "running" | "finishing" | "finished"
META_RECORDING_PATH = "recording_path"
META_RECORDING_BYTES = "recording_bytes"
META_RECORDING_ERROR = "recording_error"

#: connection states a rank can be in, as shown by the views
RANK_STATES = ("connected", "finished", "disconnected", "died", "unknown")


@dataclass(frozen=True)
class RankInfo:
    """What the aggregator knows about one rank besides its rows."""

    rank: int
    local_rank: int = -1
    node_rank: int = -1
    host: str = ""
    pid: int = -1
    state: str = "unknown"
    exit_status: str = ""  # "ok" | "failed" | "" (not finished)
    last_seen_ns: int = 0
    #: rows lost before reaching the aggregator, per table (rank-side evictions + client drops)
    drops: Mapping[str, int] = field(default_factory=dict)
    died_ns: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "node_rank": self.node_rank,
            "host": self.host,
            "pid": self.pid,
            "state": self.state,
            "exit_status": self.exit_status,
            "last_seen_ns": self.last_seen_ns,
            "drops": dict(self.drops),
            "died_ns": self.died_ns,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RankInfo:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["drops"] = {str(k): int(v) for k, v in dict(known.get("drops", {})).items()}
        return cls(**known)


@dataclass(frozen=True)
class StoreView:
    meta: Mapping[str, Any] = field(default_factory=dict)
    schemas: Mapping[str, TableSchema] = field(default_factory=dict)
    #: (table, rank) -> {column: read-only numpy array}
    tables: Mapping[tuple[str, int], Mapping[str, np.ndarray]] = field(default_factory=dict)
    rank_info: Mapping[int, RankInfo] = field(default_factory=dict)
    attachments: Mapping[str, Any] = field(default_factory=dict)
    #: (table, rank) -> rows evicted from the bounded live window (0 in replay)
    evicted: Mapping[tuple[str, int], int] = field(default_factory=dict)
    #: newest ``ts_ns`` seen in any table (the view's "now")
    latest_ns: int = 0
    #: integrity verdict of the source file, None when live
    integrity: Mapping[str, Any] | None = None
    #: statistics of every row when ``tables`` hold only a sample of a long recording (a bounded
    #: replay, :mod:`traceml.views.bounded`): ``"step_time"`` -> its StepTotals; empty otherwise
    digests: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        seen = {r for (_, r) in self.tables} | set(self.rank_info)
        return sorted(seen)

    def table_names(self) -> list[str]:
        return sorted({t for (t, _) in self.tables})

    def table_ranks(self, table: str) -> list[int]:
        return sorted(r for (t, r) in self.tables if t == table)

    def has(self, table: str) -> bool:
        return any(t == table and len(next(iter(c.values()), ())) for (t, _), c in self.tables.items())

    def columns(self, table: str, rank: int) -> Mapping[str, np.ndarray]:
        """Columns of one rank's table; empty arrays when absent."""
        cols = self.tables.get((table, rank))
        if cols is not None:
            return cols
        schema = self.schemas.get(table) or STANDARD_TABLES.get(table)
        if schema is None:
            return {}
        return {
            k: (v if isinstance(v, np.ndarray) else np.asarray(v, dtype=object))
            for k, v in empty_columns(schema).items()
        }

    def rows(self, table: str, rank: int) -> int:
        cols = self.tables.get((table, rank))
        return len(next(iter(cols.values()))) if cols else 0

    def total_rows(self, table: str | None = None) -> int:
        return sum(self.rows(t, r) for (t, r) in self.tables if table is None or t == table)

    def dropped(self, rank: int | None = None) -> int:
        """Rows lost before reaching the store (rank-side), summed over tables."""
        infos = self.rank_info.values() if rank is None else [self.rank_info[rank]] if rank in self.rank_info else []
        return sum(sum(i.drops.values()) for i in infos)
