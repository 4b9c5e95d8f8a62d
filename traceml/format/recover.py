"""Rewrite a crashed or damaged recording as a clean one (index, summary, footer).

Everything still decodable is copied and what was skipped is reported; the output appears only when complete.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traceml import names
from traceml.errors import ConfigError, FormatError
from traceml.format.reader import open_recording
from traceml.format.writer import TmlWriter
from traceml.schema import is_rollup


@dataclass(frozen=True)
class RecoveryResult:
    rows: int
    segments: int
    attachments: int
    #: the source's integrity after every record was read
    integrity: dict[str, Any]
    #: what could not be restored as it was (header fields, tables, attachments), one line each
    unrestored: list[str] = field(default_factory=list)

    @property
    def lost(self) -> bool:
        """Whether bytes of the source could not be copied."""
        return bool(self.integrity["skipped"])


def _run_meta(header: dict[str, Any], unrestored: list[str]) -> dict[str, Any]:
    meta = dict(header.get("meta") or {})
    meta.update(
        run_id=header.get("run_id", ""),
        hosts=header.get("hosts", []),
        world_size=header.get("world_size", -1),
        command=header.get("command", []),
    )
    if not isinstance(meta["world_size"], int):
        meta["world_size"] = -1
    for key, max_len in (("run_id", names.MAX_LABEL), ("run_name", names.MAX_LABEL)):
        value = meta.get(key)
        if value is not None and names.label_problem(value, key, max_len) is not None:
            meta[key] = names.safe_label(value, max_len)
            unrestored.append(f"HEADER {key}: control characters replaced by U+FFFD")
    for key, max_len in (("hosts", names.MAX_LABEL), ("command", names.MAX_ARG)):
        values = meta.get(key)
        values = list(values) if isinstance(values, list) else []
        if names.labels_problem(values, key, max_len) is not None or len(values) > names.MAX_ARGS:
            meta[key] = [names.safe_label(v, max_len) for v in values[: names.MAX_ARGS]]
            unrestored.append(f"HEADER {key}: control characters replaced by U+FFFD")
        else:
            meta[key] = values
    return meta


def recover(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> RecoveryResult:
    source, target = Path(src), Path(dst)
    if source.resolve() == target.resolve():
        raise ConfigError(f"recover writes a new file: choose an output other than {source}")
    partial = target.with_name(target.name + ".partial")
    rows = 0
    unrestored: list[str] = []
    refused: dict[str, str] = {}
    with open_recording(source) as reader:
        header = reader.header
        if reader.header_restored is not None:
            unrestored.append(f"HEADER damaged: {reader.header_restored}")
        meta = _run_meta(header, unrestored)
        schemas = [s for s in reader.schemas.values() if not is_rollup(s.name)]
        good = []
        for schema in schemas:
            problem = names.name_problem(schema.name) or next(
                (p for c in schema.columns if (p := names.column_problem(c.name)) is not None), None
            )
            if problem is None:
                good.append(schema)
            else:
                refused[schema.name] = problem
        try:
            with TmlWriter(partial, run_meta=meta, schemas=good) as writer:
                reader.verify()  # every record, not only the indexed ones: finds all damage and segments
                for rank, table, columns in reader.iter_batches():
                    if table in refused:
                        continue
                    try:
                        writer.append(rank, table, columns)
                    except ConfigError as exc:  # a name or value today's writer refuses
                        refused.setdefault(table, str(exc))
                        continue
                    rows += len(next(iter(columns.values()), ()))
                integrity = reader.integrity
                attachments = reader.attachments
                for name, data in attachments.items():
                    if name == "summary":
                        continue
                    try:
                        writer.attach(name, data)
                    except ConfigError as exc:
                        unrestored.append(f"attachment {names.shown(name)} left out: {exc}")
                unrestored += [f"table {names.shown(t)} left out: {why}" for t, why in refused.items()]
                writer.attach(
                    "recovered_from",
                    {
                        "path": str(source),
                        "writer": header.get("writer", ""),
                        "created_ns": header.get("created_ns", 0),
                        "integrity": integrity,
                        "unrestored": unrestored,
                    },
                )
                writer.close(summary=attachments.get("summary"))
            os.replace(partial, target)
        except OSError as exc:
            raise FormatError(f"cannot write {target}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                partial.unlink()
        segments = len(reader.segments)
    return RecoveryResult(
        rows=rows, segments=segments, attachments=len(attachments), integrity=integrity, unrestored=unrestored
    )
