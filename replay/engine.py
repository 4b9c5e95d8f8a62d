"""The replay engine: a ``.tml`` recording as the same :class:`StoreView` the aggregator fills.

Reads through the file's index; works on crashed and damaged files (``integrity`` says what was lost).
Never imports torch.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType
from typing import Any, overload

import numpy as np

from traceml.errors import FormatError, ReplayError
from traceml.format import SegmentInfo, TmlReader, open_recording
from traceml.schema import STANDARD_TABLES, TableSchema, is_rollup, rollup_name, rollup_schema
from traceml.store import ColumnStore, RankInfo, StoreView
from traceml.store.view import META_RECORDING_BYTES, META_RECORDING_PATH, META_START_NS, META_STATUS

Columns = dict[str, np.ndarray]
#: (low, high) inclusive; None on a side leaves it open
Bounds = tuple[int | None, int | None]

#: show the loading progress bar for files at least this large, or loads slower than PROGRESS_AFTER_S
PROGRESS_MIN_BYTES = 64 << 20
PROGRESS_AFTER_S = 0.5
#: at most this many decoding threads
MAX_WORKERS = 4
#: below this share of their segments' rows, tables are read stream by stream (read_table) instead of
#: decoding whole segments
BY_TABLE_SHARE = 0.5
#: attachments written when the run ends (a replay shows them at its end)
END_ATTACHMENTS = ("exit", "ranks", "summary")


def _default_workers() -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


class _Progress:
    """Loading progress on stderr, only for big files or slow loads: a Rich bar on a terminal,
    one summary line otherwise (logs, CI).  Units are rows."""

    def __init__(self, label: str, total_rows: int, file_bytes: int, enabled: bool | None) -> None:
        self._label = label
        self._total = max(total_rows, 1)
        self._bytes = file_bytes
        self._enabled = enabled
        self._start = time.monotonic()
        self._console: Any = None
        self._bar: Any = None
        self._task: Any = None

    def _wanted(self) -> bool:
        if self._enabled is not None:
            return self._enabled
        return self._bytes >= PROGRESS_MIN_BYTES or time.monotonic() - self._start > PROGRESS_AFTER_S

    def update(self, done_rows: int) -> None:
        if self._console is None:
            if not self._wanted():
                return
            from rich.console import Console

            self._console = Console(stderr=True)
            if self._console.is_terminal:
                from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

                self._bar = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TaskProgressColumn(),
                    TimeRemainingColumn(),
                    console=self._console,
                    transient=True,
                    auto_refresh=False,  # no refresh thread: refreshed as work completes
                )
                self._bar.start()
                self._task = self._bar.add_task(self._label, total=self._total)
        if self._bar is not None:
            self._bar.update(self._task, completed=min(done_rows, self._total))
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._console is not None:
            took = time.monotonic() - self._start
            self._console.print(f"{self._label}: {self._total:,} rows in {took:.2f} s", highlight=False)
        self._console = None


class Recording:
    """A recording opened for replay.  Use :func:`open`; close it (or use ``with``) when done."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        follow: bool = False,
        progress: bool | None = None,
        workers: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ReplayError(f"recording {str(self.path)!r} not found; expected a .tml file written by `traceml run`")
        if self.path.is_dir():
            raise ReplayError(f"{str(self.path)!r} is a directory; expected a .tml file (e.g. {self.path}/run.tml)")
        self._reader: TmlReader = open_recording(self.path, follow=follow)
        self.follow = follow
        self._progress = progress
        self._workers = workers or _default_workers()
        self._lock = threading.Lock()
        self._tables: dict[str, dict[int, Columns]] = {}
        self._damage: dict[int, dict[str, Any]] = {}
        self._view: StoreView | None = None

    # -- what the file says -------------------------------------------------------------
    @property
    def header(self) -> dict[str, Any]:
        return self._reader.header

    @property
    def schemas(self) -> dict[str, TableSchema]:
        return self._reader.schemas

    @property
    def segments(self) -> list[SegmentInfo]:
        return self._reader.segments

    @property
    def attachments(self) -> dict[str, dict[str, Any]]:
        return self._reader.attachments

    @property
    def ranks(self) -> list[int]:
        """Every rank with rows in the file, and those the ``ranks`` attachment names."""
        named = {int(r["rank"]) for r in _rank_dicts(self.attachments) if "rank" in r}
        return sorted(set(self._reader.ranks) | named)

    @property
    def tables(self) -> list[str]:
        return self._reader.tables

    @property
    def rows(self) -> dict[str, int]:
        """Rows per table, from the index."""
        out: dict[str, int] = {}
        for seg in self._reader.segments:
            for (_, table), n in seg.rows.items():
                if not is_rollup(table):
                    out[table] = out.get(table, 0) + n
        return dict(sorted(out.items()))

    @property
    def start_ns(self) -> int:
        meta = self.header.get("meta") or {}
        start = meta.get(META_START_NS)
        if isinstance(start, int) and start > 0:
            return start
        t = [s.t_min for s in self._reader.segments if s.t_min is not None]
        return min(t) if t else int(self.header.get("created_ns", 0) or 0)

    @property
    def end_ns(self) -> int:
        t = [s.t_max for s in self._reader.segments if s.t_max is not None]
        return max(t) if t else self.start_ns

    @property
    def integrity(self) -> dict[str, Any]:
        """The reader's verdict plus damage found while decoding (``status``, ``skipped``, ``lost_bytes``, ``message``)."""
        base = dict(self._reader.integrity)
        with self._lock:
            extra = [d for off, d in self._damage.items() if off not in {s["offset"] for s in base["skipped"]}]
        if not extra:
            return base
        skipped = sorted([*base["skipped"], *extra], key=lambda s: s["offset"])
        lost = sum(int(s["length"]) for s in skipped)
        first = skipped[0]
        return {
            "status": "damaged",
            "skipped": skipped,
            "lost_bytes": lost,
            "message": f"damaged: {len(skipped)} span(s), {lost} bytes skipped; first at byte {first['offset']}: {first['reason']}",
        }

    @property
    def meta(self) -> dict[str, Any]:
        """Run metadata as the live store holds it: the writer's run meta, plus status and file facts."""
        header = self.header
        meta: dict[str, Any] = dict(header.get("meta") or {})
        meta.setdefault("run_id", header.get("run_id", ""))
        hosts = header.get("hosts") or []
        if hosts and "host" not in meta:
            meta["host"] = hosts[0]
        meta.setdefault(META_START_NS, self.start_ns)
        if "exit" in self.attachments or self._reader.integrity["status"] == "complete":
            status = "finished"
        else:
            status = "running" if self.follow else "incomplete"
        meta[META_STATUS] = status
        meta[META_RECORDING_PATH] = str(self.path)
        try:
            meta[META_RECORDING_BYTES] = self.path.stat().st_size
        except OSError:
            meta[META_RECORDING_BYTES] = 0
        return meta

    def rank_infos(self, tables: Mapping[str, Mapping[int, Columns]] | None = None) -> dict[int, RankInfo]:
        """The rank table: from the ``ranks`` attachment when the run ended, else from the
        ``environment/rank<N>`` attachments and the rows (state ``unknown``)."""
        infos: dict[int, RankInfo] = {}
        for d in _rank_dicts(self.attachments):
            try:
                info = RankInfo.from_dict(d)
            except (TypeError, ValueError, KeyError):
                continue
            infos[info.rank] = info
        for name, env in self.attachments.items():
            if not name.startswith("environment/rank"):
                continue
            try:
                rank = int(name.removeprefix("environment/rank"))
            except ValueError:
                continue
            if rank in infos or not isinstance(env, Mapping):
                continue
            infos[rank] = RankInfo(
                rank=rank,
                local_rank=_int(env.get("local_rank"), -1),
                node_rank=_int(env.get("node_rank"), -1),
                host=str(env.get("host", "") or ""),
                pid=_int(env.get("pid"), -1),
            )
        last_seen: dict[int, int] = {}
        for per_rank in (tables or {}).values():
            for rank, cols in per_rank.items():
                ts = cols.get("ts_ns")
                if ts is not None and len(ts):
                    last_seen[rank] = max(last_seen.get(rank, 0), int(ts.max()))
        for rank in set(self._reader.ranks) | set(last_seen):
            if rank not in infos:
                infos[rank] = RankInfo(rank=rank, last_seen_ns=last_seen.get(rank, 0))
            elif not infos[rank].last_seen_ns and rank in last_seen:
                infos[rank] = dataclasses.replace(infos[rank], last_seen_ns=last_seen[rank])
        return dict(sorted(infos.items()))

    # -- rows -------------------------------------------------------------------------
    @overload
    def columns(self, table: str, rank: int, steps: Bounds | None = None, time: Bounds | None = None) -> Columns: ...

    @overload
    def columns(
        self, table: str, rank: None = None, steps: Bounds | None = None, time: Bounds | None = None
    ) -> dict[int, Columns]: ...

    def columns(
        self, table: str, rank: int | None = None, steps: Bounds | None = None, time: Bounds | None = None
    ) -> Columns | dict[int, Columns]:
        """Rows of ``table`` as numpy arrays: ``{column: array}`` for one ``rank``, else ``{rank: {column: array}}``.

        ``steps=(a, b)`` keeps steps a..b (tables with a ``step`` column); ``time=(t0, t1)`` keeps
        ``ts_ns`` in t0..t1 (wall-clock ns, like the ``ts_ns`` column; see :attr:`start_ns`).  Both
        inclusive.  Segments outside the bounds are skipped through the index, not read.
        """
        if table not in self.schemas and table not in self.tables:
            raise ReplayError(
                f"{self.path.name} has no table {table!r}; it has {', '.join(self.tables) or 'no tables'}"
            )
        ranks = None if rank is None else [rank]
        cached = self._tables.get(table)
        if cached is not None:
            out = {r: _trim(c, steps, time) for r, c in cached.items() if ranks is None or r in ranks}
        else:
            try:
                out = self._reader.read_table(table, ranks=ranks, step_range=steps, time_range=time)
            except FormatError as exc:
                raise ReplayError(f"reading table {table!r} from {self.path}: {exc}") from exc
        if rank is not None:
            return out.get(rank) or _empty(self.schemas.get(table) or STANDARD_TABLES.get(table))
        return out

    def load(self, tables: Iterable[str] | None = None) -> dict[str, dict[int, Columns]]:
        """Decode ``tables`` (all by default) into memory, in parallel, with a progress bar for big files."""
        wanted = set(self.tables if tables is None else tables)
        with self._lock:
            missing = wanted - set(self._tables)
        if missing:
            loaded = self._decode(missing)
            with self._lock:
                for name in missing:
                    self._tables[name] = loaded.get(name, {})
        with self._lock:
            return {t: self._tables[t] for t in wanted if t in self._tables}

    def _decode(self, tables: set[str]) -> dict[str, dict[int, Columns]]:
        """Decode ``tables`` with a few threads, each with its own reader (a reader is single-threaded).

        When the tables are a small share of the rows in their segments (the step charts' first
        load), each table is read with ``read_table`` split by rank, which decodes only those
        streams; otherwise segments are split between the threads and decoded whole.
        """
        segments = [s for s in self._reader.segments if s.tables & tables]
        if not segments:
            return {}
        seg_rows = sum(n for s in segments for n in s.rows.values())
        want_rows = sum(n for s in segments for (_, t), n in s.rows.items() if t in tables)
        schemas = self.schemas
        progress = _Progress(f"loading {self.path.name}", want_rows, self._file_bytes(), self._progress)
        try:
            if want_rows < BY_TABLE_SHARE * seg_rows and all(t in schemas for t in tables):
                return self._decode_by_table(tables, segments, progress)
            return self._decode_by_segment(tables, segments, progress)
        finally:
            progress.close()

    def _file_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def _decode_by_table(
        self, tables: set[str], segments: list[SegmentInfo], progress: _Progress
    ) -> dict[str, dict[int, Columns]]:
        rows: dict[tuple[str, int], int] = {}
        for s in segments:
            for (rank, table), n in s.rows.items():
                if table in tables:
                    rows[(table, rank)] = rows.get((table, rank), 0) + n
        jobs: list[tuple[str, list[int]]] = []
        for table in sorted(tables):
            ranks = sorted(r for (t, r) in rows if t == table)
            parts = max(1, min(self._workers, len(ranks)))
            jobs += [(table, ranks[i::parts]) for i in range(parts) if ranks[i::parts]]
        out: dict[str, dict[int, Columns]] = {}

        def work(reader: TmlReader, job: tuple[str, list[int]]) -> int:
            table, ranks = job
            got = reader.read_table(table, ranks=ranks)
            with self._lock:
                out.setdefault(table, {}).update(got)
            return sum(rows.get((table, r), 0) for r in ranks)

        self._parallel(jobs, work, progress)
        return {t: dict(sorted(per_rank.items())) for t, per_rank in out.items()}

    def _decode_by_segment(
        self, tables: set[str], segments: list[SegmentInfo], progress: _Progress
    ) -> dict[str, dict[int, Columns]]:
        chunks: dict[tuple[str, int], list[tuple[int, Columns]]] = {}

        def work(reader: TmlReader, seg: SegmentInfo) -> int:
            local: dict[tuple[str, int], list[tuple[int, Columns]]] = {}
            self._collect(reader, seg, tables, local)
            with self._lock:
                for key, parts in local.items():
                    chunks.setdefault(key, []).extend(parts)
            return sum(n for (_, t), n in seg.rows.items() if t in tables)

        self._parallel(segments, work, progress)
        out: dict[str, dict[int, Columns]] = {}
        for (table, rank), parts in sorted(chunks.items()):
            parts.sort(key=lambda p: p[0])  # file order = append order
            cols = [c for _, c in parts]
            out.setdefault(table, {})[rank] = (
                cols[0] if len(cols) == 1 else {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
            )
        return out

    def _parallel(self, items: list[Any], work: Callable[[TmlReader, Any], int], progress: _Progress) -> None:
        """Run ``work(reader, item)`` over ``items`` on up to ``workers`` threads, each with its own reader;
        damage those readers find is added to :attr:`integrity`."""
        workers = max(1, min(self._workers, len(items)))
        queue = list(reversed(items))
        lock = threading.Lock()
        done = [0]

        def run() -> None:
            reader = open_recording(self.path)
            try:
                while True:
                    with lock:
                        if not queue:
                            break
                        item = queue.pop()
                    n = work(reader, item)
                    with lock:
                        done[0] += n
            finally:
                found = reader.integrity["skipped"]
                reader.close()
                with self._lock:
                    for d in found:
                        if "writer did not finish" not in d["reason"]:
                            self._damage.setdefault(d["offset"], dict(d))

        with ThreadPoolExecutor(workers, thread_name_prefix="traceml-replay-load") as pool:
            pending: set[Future[None]] = {pool.submit(run) for _ in range(workers)}
            while pending:
                finished, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()
                with lock:
                    progress.update(done[0])

    def _collect(
        self,
        reader: TmlReader,
        seg: SegmentInfo,
        tables: set[str],
        into: dict[tuple[str, int], list[tuple[int, Columns]]],
    ) -> None:
        try:
            batches = reader.read_segment(seg)
        except FormatError as exc:
            self._note_damage(seg, exc)
            return
        for rank, table, cols in batches:
            if table in tables and cols:
                into.setdefault((table, rank), []).append((seg.offset, cols))

    def read_segment(self, seg: SegmentInfo) -> list[tuple[int, str, Columns]]:
        """The batches of one segment (``(rank, table, columns)`` in file order); a damaged
        segment gives none and is added to :attr:`integrity`."""
        try:
            return self._reader.read_segment(seg)
        except FormatError as exc:
            self._note_damage(seg, exc)
            return []

    def _note_damage(self, seg: SegmentInfo, exc: Exception) -> None:
        with self._lock:
            self._damage.setdefault(
                seg.offset,
                {"offset": seg.offset, "length": seg.length, "reason": f"SEGMENT at byte {seg.offset}: {exc}"},
            )

    def has_rollup(self, table: str) -> bool:
        """Whether the writer stored a rollup of *table* (files of format 1.1 and later)."""
        return rollup_name(table) in self.schemas

    def rollup(self, table: str) -> dict[int, Columns]:
        """The rollup of *table* per rank (:mod:`traceml.format.rollup`): one row per group of
        steps with counts, sums, min and max, so a long run draws without reading every row.
        The stored rollup plus the raw rows it does not cover (a crashed writer's tail)."""
        try:
            return self._reader.read_rollup(table)
        except FormatError as exc:
            raise ReplayError(f"reading the rollup of {table!r} from {self.path}: {exc}") from exc

    # -- the store view -----------------------------------------------------------------
    def rollup_store(self, tables: Iterable[str]) -> ColumnStore:
        """A store holding only the rollups of *tables* (``rollup/<table>``), the run's metadata,
        ranks and attachments: what the first charts of a long recording draw from."""
        store = ColumnStore(capacity=None, meta=self.meta)
        loaded: dict[str, dict[int, Columns]] = {}
        for table in tables:
            schema = self.schemas.get(table)
            rolled = None if schema is None else rollup_schema(schema)
            if rolled is None:
                continue
            per_rank = loaded[rolled.name] = self.rollup(table)
            store.add_schema(rolled)
            for rank, cols in per_rank.items():
                store.append(rank, rolled.name, cols, rolled)
        return self.fill_end_state(store)

    def store(self, tables: Iterable[str] | None = None) -> ColumnStore:
        """A new unbounded ColumnStore filled from the file, as the aggregator's was at the end."""
        loaded = self.load(tables)
        store = ColumnStore(capacity=None, meta=self.meta)
        schemas = self.schemas
        for table, per_rank in sorted(loaded.items()):
            schema = schemas.get(table) or STANDARD_TABLES.get(table)
            if schema is not None:
                store.add_schema(schema)
            for rank, cols in per_rank.items():
                store.append(rank, table, cols, schema)
        return self.fill_end_state(store, loaded)

    def fill_end_state(
        self, store: ColumnStore, tables: Mapping[str, Mapping[int, Columns]] | None = None
    ) -> ColumnStore:
        """Give *store* what the file says of the run as a whole: the rank table (where the file
        knows no state, ``unknown``, it replaces only the store's placeholder: a tail keeps the
        ranks it saw connect), every attachment, the status and size of the file, its integrity.
        *tables*: the rows loaded, for the ranks' last-seen times.  Returns *store*."""
        for info in self.rank_infos(tables).values():
            if info.state != "unknown" or store.rank_info(info.rank) in (None, RankInfo(rank=info.rank)):
                store.set_rank(info)
        for name, data in self.attachments.items():
            store.attach(name, data)
        meta = self.meta
        store.set_meta(**{META_STATUS: meta[META_STATUS], META_RECORDING_BYTES: meta[META_RECORDING_BYTES]})
        store.set_integrity(self.integrity)
        return store

    def view(self) -> StoreView:
        """The whole recording as a :class:`StoreView` (loaded once, then cached)."""
        if self._view is None or self.follow:
            self._view = self.store().snapshot()
        return self._view

    def bounded_view(self, row_budget: int | None = None) -> StoreView:
        """The recording as a view of at most about ``row_budget`` rows (``TRACEML_ROW_BUDGET``,
        default 1,000,000): :meth:`view` when every row fits, else one pass over the file into
        exact totals, 1% quantile sketches and a sample of the rows (:mod:`replay.bounded`)."""
        from replay.bounded import bounded_view

        return bounded_view(self, row_budget)

    def summary(self, *, flat: bool = True, recent_steps: int | None = None) -> dict[str, Any]:
        """The run summary, recomputed from the rows (what ``traceml report`` writes as summary.json),
        in bounded memory (:meth:`bounded_view`).

        ``flat=True`` (default): flat numeric ``traceml/<section>/<metric>`` keys that
        ``wandb.run.summary.update`` and ``mlflow.log_metrics`` take as they are
        (:func:`traceml.diagnosis.flat.flatten_summary`); ``flat=False``: the nested summary.
        """
        from traceml.diagnosis import build_summary, thresholds
        from traceml.diagnosis.flat import flatten_summary

        nested = build_summary(self.bounded_view(), recent_steps=recent_steps or thresholds.RECENT_STEPS)
        return dict(flatten_summary(nested)) if flat else nested

    # -- follow mode -------------------------------------------------------------------
    def poll(self) -> list[tuple[int, str, Columns]]:
        """Follow mode: the batches written since open or the previous poll."""
        try:
            batches = self._reader.poll()
        except FormatError as exc:
            raise ReplayError(f"following {self.path}: {exc}") from exc
        if batches:
            with self._lock:  # what was loaded is stale now: the next load() reads the index again
                self._tables.clear()
                self._view = None
        return batches

    @property
    def finished(self) -> bool:
        """The writer closed the file (it has its footer)."""
        return bool(self._reader.integrity["status"] == "complete")

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Recording:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Recording({str(self.path)!r}, ranks={self.ranks}, tables={self.tables}, {self.integrity['status']})"


def _rank_dicts(attachments: Mapping[str, Any]) -> list[dict[str, Any]]:
    doc = attachments.get("ranks")
    ranks = doc.get("ranks") if isinstance(doc, Mapping) else None
    return [dict(r) for r in ranks if isinstance(r, Mapping)] if isinstance(ranks, list) else []


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _empty(schema: TableSchema | None) -> Columns:
    if schema is None:
        return {}
    from traceml.schema import empty_columns

    return {
        k: (v if isinstance(v, np.ndarray) else np.asarray(v, dtype=object)) for k, v in empty_columns(schema).items()
    }


def _trim(cols: Columns, steps: Bounds | None, time_: Bounds | None) -> Columns:
    mask: np.ndarray | None = None
    for column, bounds in (("step", steps), ("ts_ns", time_)):
        if bounds is None or column not in cols:
            continue
        values = cols[column]
        keep = np.ones(len(values), dtype=bool)
        if bounds[0] is not None:
            keep &= values >= bounds[0]
        if bounds[1] is not None:
            keep &= values <= bounds[1]
        mask = keep if mask is None else mask & keep
    if mask is None or mask.all():
        return cols
    return {k: v[mask] for k, v in cols.items()}


def open(
    path: str | os.PathLike[str],
    *,
    follow: bool = False,
    progress: bool | None = None,
    workers: int | None = None,
) -> Recording:
    """Open a ``.tml`` recording for replay.  Reads only the header and index; rows load on demand.

    ``follow=True`` tails a file still being written (see :meth:`Recording.poll`).
    ``progress``: None shows a bar on stderr for big or slow loads, True always, False never.
    Raises :class:`~traceml.errors.ReplayError` for a missing path and the format's errors
    (``NotATmlFileError``, ``UnsupportedVersionError``, ...) for a file that cannot be opened at all.
    """
    return Recording(path, follow=follow, progress=progress, workers=workers)
