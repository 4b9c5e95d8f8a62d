"""Parquet export: every table of a recording as a Hive-partitioned dataset, streamed in bounded memory.

Names read from the recording never become paths unchecked; re-exporting a run is refused unless
``overwrite``.  pyarrow is imported only here, on use.  Layout: docs/internals.md, "Format".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from traceml.errors import FormatError, MissingDependencyError, OutputExistsError
from traceml.format.reader import TmlReader
from traceml.outpaths import safe_filename
from traceml.schema import STR, TableSchema

INSTALL_HINT = "pip install 'traceml-recorder[parquet]'"

#: a table name that may become a directory name as it is
_SAFE_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: a run id that may become a ``run=<id>`` partition value as it is
_SAFE_RUN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_PART = re.compile(r"part-\d{5,}\.parquet")
#: columns the export adds (rank and run come from the partition directories)
RUN_COLUMNS = ("run_id", "run_name", "node")
_RESERVED = frozenset({*RUN_COLUMNS, "rank", "run"})
_META_PREFIX = "traceml."


@dataclass
class ParquetExport:
    """What :func:`export_parquet` wrote."""

    out_dir: Path
    run_id: str
    partition: str  # "" (one run in the directory) or the run=<value> directory name
    rows: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    #: tables not exported, with the reason (names are repr()-quoted: they come from the file)
    skipped: dict[str, str] = field(default_factory=dict)
    moved_runs: list[str] = field(default_factory=list)
    #: the most bytes of rows held waiting to be written at once (bounded by ``max_buffer_bytes``
    #: plus the batch that crossed it)
    peak_buffered_bytes: int = 0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def require_pyarrow() -> Any:
    """``pyarrow`` (and ``pyarrow.parquet``), or a :class:`MissingDependencyError` with the pip line."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise MissingDependencyError(
            f"the Parquet export needs pyarrow, which is not importable ({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    return pyarrow


def safe_table_name(name: str) -> bool:
    """True for a table name that is a plain identifier (letters, digits, ``_``; at most 64)."""
    return _SAFE_TABLE.fullmatch(name) is not None


def table_directory(name: str) -> str:
    """The dataset directory of table *name*: the name itself when it is a plain identifier,
    else a safe file name for it (``custom/loss`` -> ``custom_loss-<8 hex digits>``)."""
    return name if safe_table_name(name) else safe_filename(name)


def run_partition_value(run_id: str) -> str:
    """The ``run=<value>`` value for *run_id*: the id itself when it is path-safe, else a digest of it."""
    if _SAFE_RUN.fullmatch(run_id) and ".." not in run_id:
        return run_id
    return "h" + hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def export_parquet(
    reader: TmlReader,
    out_dir: str | os.PathLike[str],
    *,
    row_group_rows: int = 128 * 1024,
    max_buffer_bytes: int = 64 << 20,
    max_open_files: int = 64,
    compression: str = "zstd",
    overwrite: bool = False,
) -> ParquetExport:
    """Write every data table of *reader* under *out_dir* (see the module docstring for the layout)."""
    pa = require_pyarrow()
    out = Path(out_dir)
    header = reader.header
    meta: Mapping[str, Any] = header["meta"] if isinstance(header.get("meta"), Mapping) else {}
    run_id = str(header.get("run_id") or "")
    run_name = str(meta.get("run_name") or header.get("run_name") or "")
    partition_value = run_partition_value(run_id)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FormatError(f"cannot create the output directory {out}: {exc.strerror or exc}") from exc

    result = ParquetExport(out_dir=out, run_id=run_id, partition="")
    schemas: dict[str, TableSchema] = {}
    directories: dict[str, str] = {}
    for table in reader.tables:
        schema = reader.schemas.get(table)
        directory = table_directory(table)
        if directory in directories.values():
            result.skipped[repr(table)[:80]] = f"its directory name {directory!r} is another table's"
        elif schema is None:
            result.skipped[table] = "its SCHEMA record is missing from the recording"
        elif _RESERVED & set(schema.names):
            clash = ", ".join(sorted(_RESERVED & set(schema.names)))
            result.skipped[table] = f"its columns ({clash}) clash with the columns the export adds"
        else:
            schemas[table] = schema
            directories[table] = directory
    if not schemas:
        return result

    layout = _Layout(out, pa, directories)
    multi = layout.prepare(run_id, partition_value, sorted(schemas), overwrite=overwrite)
    result.partition = f"run={partition_value}" if multi else ""
    result.moved_runs = layout.moved
    file_meta = _file_metadata(reader, header, run_id, run_name)
    nodes = _node_ranks(reader.attachments)
    sink = _Sink(
        pa,
        lambda table, rank: layout.base(table, partition_value if multi else None) / f"rank={int(rank)}",
        schemas,
        file_meta,
        row_group_rows=row_group_rows,
        max_buffer_bytes=max_buffer_bytes,
        max_open_files=max_open_files,
        compression=compression,
    )
    try:
        for rank, table, cols in reader.iter_batches():
            if table not in schemas:
                continue
            n = len(next(iter(cols.values()))) if cols else 0
            if n == 0:
                continue
            extra = {"run_id": run_id, "run_name": run_name, "node": nodes.get(rank, -1)}
            if not sink.add(table, rank, {**cols, **extra}, n):
                result.skipped.setdefault(table, "some segments' columns differ from the table schema")
    finally:
        files = sink.close()
    result.files = files
    result.rows = sink.rows
    result.peak_buffered_bytes = sink.peak_buffered_bytes
    return result


class _Layout:
    """The directories of the datasets in *out*: one run (``rank=`` below the table) or many (``run=``)."""

    def __init__(self, out: Path, pa: Any, directories: Mapping[str, str]) -> None:
        self.out = out
        self.pa = pa
        self.directories = dict(directories)
        self.moved: list[str] = []

    def base(self, table: str, partition: str | None) -> Path:
        table_dir = self.out / self.directories[table]
        return table_dir if partition is None else table_dir / f"run={partition}"

    def prepare(self, run_id: str, partition: str, tables: list[str], *, overwrite: bool) -> bool:
        """Decide the layout, move a single run under its ``run=`` directory when needed, and
        remove this run's earlier export (only with *overwrite*; else refuse before writing);
        True when the directory holds runs by partition."""
        singles: dict[Path, str] = {}  # table dir in the one-run layout -> the run id in its files
        multi = False
        table_dirs = (p for p in self.out.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
        for table_dir in sorted(table_dirs):
            children = [c for c in table_dir.iterdir() if c.is_dir()]
            if any(c.name.startswith("run=") for c in children):
                multi = True
            if any(c.name.startswith("rank=") for c in children):
                singles[table_dir] = self._run_of(table_dir)
        if any(other != run_id for other in singles.values()):
            multi = True
        existing = [d for d, other in singles.items() if other == run_id] + [
            self.base(t, partition) for t in tables if multi and _has_parts(self.base(t, partition))
        ]
        if existing and not overwrite:
            raise OutputExistsError(
                f"{self.out} holds an export of run {run_id!r} already ({existing[0]}); traceml does not replace"
                " files unasked: choose another -o, or add --overwrite to replace that run's files"
            )
        if multi:
            for table_dir, other in singles.items():
                if other == run_id:  # this run's own earlier export: it is written again by partition
                    _remove_parts(table_dir)
                    for child in table_dir.glob("rank=*"):
                        with contextlib.suppress(OSError):
                            child.rmdir()  # only when empty
                    continue
                target = table_dir / f"run={run_partition_value(other)}"
                target.mkdir(exist_ok=True)
                for child in sorted(table_dir.iterdir()):
                    if child.is_dir() and child.name.startswith("rank="):
                        _rename(child, target / child.name)
                if other not in self.moved:
                    self.moved.append(other)
        for table in tables:
            base = self.base(table, partition if multi else None)
            if base.is_dir():
                _remove_parts(base)
        return multi

    def _run_of(self, table_dir: Path) -> str:
        for part in sorted(table_dir.glob("rank=*/part-*.parquet")):
            try:
                kv = self.pa.parquet.read_metadata(part).metadata or {}
            except (OSError, self.pa.ArrowException) as exc:
                raise FormatError(
                    f"{part} is not a readable Parquet file ({exc}); the output directory must hold only"
                    " traceml Parquet exports: choose another directory or remove it"
                ) from exc
            value = kv.get(f"{_META_PREFIX}run_id".encode())
            if value is not None:
                return str(value.decode("utf-8", "replace"))
        raise FormatError(
            f"{table_dir} holds rank= directories without a traceml Parquet file naming its run;"
            " choose another output directory"
        )


class _Sink:
    """Per (table, rank): buffered columns, flushed as row groups into bounded open writers."""

    def __init__(
        self,
        pa: Any,
        directory: Any,
        schemas: Mapping[str, TableSchema],
        file_meta: Mapping[str, str],
        *,
        row_group_rows: int,
        max_buffer_bytes: int,
        max_open_files: int,
        compression: str,
    ) -> None:
        self.pa = pa
        self.directory = directory
        self.row_group_rows = max(1, int(row_group_rows))
        self.max_buffer_bytes = max(1, int(max_buffer_bytes))
        self.max_open_files = max(1, int(max_open_files))
        self.compression = compression
        self.arrow_schemas = {
            name: _arrow_schema(pa, schema, {**file_meta, f"{_META_PREFIX}table": name})
            for name, schema in schemas.items()
        }
        self.buffers: dict[tuple[str, int], list[Any]] = {}
        self.buffered_rows: dict[tuple[str, int], int] = {}
        self.buffered_bytes = 0
        self.peak_buffered_bytes = 0
        self.writers: OrderedDict[tuple[str, int], tuple[Any, Path]] = OrderedDict()
        self.parts: dict[tuple[str, int], int] = {}
        self.rows: dict[str, int] = {}
        self.files: list[Path] = []

    def add(self, table: str, rank: int, cols: Mapping[str, Any], n: int) -> bool:
        """Buffer *n* rows (a value that is not an array is that value on every row); False: they do not fit the schema."""
        schema = self.arrow_schemas[table]
        try:
            arrays = [_arrow_column(self.pa, cols[f.name], f.type, n) for f in schema]
            batch = self.pa.record_batch(arrays, schema=schema)
        except (KeyError, ValueError, TypeError, self.pa.ArrowException):
            return False
        key = (table, rank)
        self.buffers.setdefault(key, []).append(batch)
        self.buffered_rows[key] = self.buffered_rows.get(key, 0) + n
        self.buffered_bytes += batch.nbytes
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)
        if self.buffered_rows[key] >= self.row_group_rows:
            self._flush(key)
        while self.buffered_bytes > self.max_buffer_bytes and self.buffers:
            self._flush(max(self.buffered_rows, key=self.buffered_rows.__getitem__))
        return True

    def close(self) -> list[Path]:
        try:
            for key in list(self.buffers):
                self._flush(key)
        finally:
            while self.writers:
                self._close_writer(next(iter(self.writers)))
        return self.files

    def _flush(self, key: tuple[str, int]) -> None:
        batches = self.buffers.pop(key, [])
        self.buffered_rows.pop(key, None)
        self.buffered_bytes -= sum(b.nbytes for b in batches)
        if not batches:
            return
        writer = self._writer(key)
        try:
            writer.write_table(self.pa.Table.from_batches(batches), row_group_size=self.row_group_rows)
        except (OSError, self.pa.ArrowException) as exc:
            raise FormatError(f"writing Parquet for {key[0]} rank {key[1]} failed: {exc}") from exc
        self.rows[key[0]] = self.rows.get(key[0], 0) + sum(b.num_rows for b in batches)

    def _writer(self, key: tuple[str, int]) -> Any:
        if key in self.writers:
            self.writers.move_to_end(key)
            return self.writers[key][0]
        while len(self.writers) >= self.max_open_files:
            self._close_writer(next(iter(self.writers)))
        directory = Path(self.directory(*key))
        part = self.parts.get(key, 0)
        self.parts[key] = part + 1
        final = directory / f"part-{part:05d}.parquet"
        temp = final.with_name(final.name + ".tmp")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            writer = self.pa.parquet.ParquetWriter(temp, self.arrow_schemas[key[0]], compression=self.compression)
        except (OSError, self.pa.ArrowException) as exc:
            raise FormatError(f"cannot write {final}: {exc}") from exc
        self.writers[key] = (writer, final)
        return writer

    def _close_writer(self, key: tuple[str, int]) -> None:
        writer, final = self.writers.pop(key)
        try:
            writer.close()
            os.replace(final.with_name(final.name + ".tmp"), final)
        except (OSError, self.pa.ArrowException) as exc:
            raise FormatError(f"cannot finish {final}: {exc}") from exc
        self.files.append(final)


def _arrow_schema(pa: Any, schema: TableSchema, metadata: Mapping[str, str]) -> Any:
    types = {"i8": pa.int64(), "i4": pa.int32(), "u1": pa.uint8(), "f8": pa.float64(), "f4": pa.float32()}
    fields = [pa.field(c.name, pa.string() if c.dtype == STR else types[c.dtype]) for c in schema.columns]
    fields += [pa.field("run_id", pa.string()), pa.field("run_name", pa.string()), pa.field("node", pa.int32())]
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in metadata.items()})


def _arrow_column(pa: Any, values: Any, type_: Any, n: int) -> Any:
    if not isinstance(values, np.ndarray | list):
        return pa.repeat(pa.scalar(values, type=type_), n)
    if len(values) != n:
        raise ValueError(f"{len(values)} values for {n} rows")
    if type_ == pa.string():
        return pa.array(values.tolist() if isinstance(values, np.ndarray) else values, type=type_)
    return pa.array(values, type=type_)


def _file_metadata(reader: TmlReader, header: Mapping[str, Any], run_id: str, run_name: str) -> dict[str, str]:
    plain = {k: v for k, v in header.items() if k not in ("sync", "schemas")}
    return {
        f"{_META_PREFIX}run_id": run_id,
        f"{_META_PREFIX}run_name": run_name,
        f"{_META_PREFIX}header": json.dumps(plain, default=repr, sort_keys=True),
        f"{_META_PREFIX}integrity": reader.integrity["status"],
        f"{_META_PREFIX}source": reader.path.name,
    }


def _node_ranks(attachments: Mapping[str, Any]) -> dict[int, int]:
    doc = attachments.get("ranks")
    entries = doc.get("ranks") if isinstance(doc, Mapping) else None
    out: dict[int, int] = {}
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, Mapping):
            continue
        rank, node = entry.get("rank"), entry.get("node_rank")
        if type(rank) is int and type(node) is int and -(1 << 31) <= node < (1 << 31):
            out[rank] = node
    return out


def _has_parts(base: Path) -> bool:
    return base.is_dir() and any(_PART.fullmatch(p.name) for p in base.glob("rank=*/*"))


def _remove_parts(base: Path) -> None:
    """Delete the part files of an earlier export of the same run (nothing else) below *base*."""
    for rank_dir in base.glob("rank=*"):
        if rank_dir.is_symlink() or not rank_dir.is_dir():
            continue
        for part in rank_dir.iterdir():
            if _PART.fullmatch(part.name.removesuffix(".tmp")) and (part.is_file() or part.is_symlink()):
                try:
                    part.unlink()
                except OSError as exc:
                    raise FormatError(f"cannot replace the earlier export {part}: {exc.strerror or exc}") from exc


def _rename(src: Path, dst: Path) -> None:
    if dst.exists():
        raise FormatError(
            f"cannot move {src} to {dst}: it exists already; the output directory holds two exports of one"
            " run in different layouts — remove one of them"
        )
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise FormatError(f"cannot move {src} to {dst}: {exc.strerror or exc}") from exc
