"""Rewrite a crashed or damaged recording as a clean one (index, summary, footer).

Everything the reader can still decode is copied; what it skipped is reported in the
result and in the new file's ``recovered_from`` attachment.  The output appears only when it is
complete (written beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traceml.errors import ConfigError, FormatError
from traceml.format.reader import open_recording
from traceml.format.writer import TmlWriter


@dataclass(frozen=True)
class RecoveryResult:
    rows: int
    segments: int
    attachments: int
    #: the source's integrity after every record was read
    integrity: dict[str, Any]

    @property
    def lost(self) -> bool:
        """Whether bytes of the source could not be copied."""
        return bool(self.integrity["skipped"])


def recover(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> RecoveryResult:
    source, target = Path(src), Path(dst)
    if source.resolve() == target.resolve():
        raise ConfigError(f"recover writes a new file: choose an output other than {source}")
    partial = target.with_name(target.name + ".partial")
    rows = 0
    with open_recording(source) as reader:
        header = reader.header
        meta = dict(header.get("meta") or {})
        meta.update(
            run_id=header.get("run_id", ""),
            hosts=header.get("hosts", []),
            world_size=header.get("world_size", -1),
            command=header.get("command", []),
        )
        try:
            with TmlWriter(partial, run_meta=meta, schemas=list(reader.schemas.values())) as writer:
                reader.verify()  # every record, not only the indexed ones: finds all damage and segments
                for rank, table, columns in reader.iter_batches():
                    writer.append(rank, table, columns)
                    rows += len(next(iter(columns.values()), ()))
                integrity = reader.integrity
                attachments = reader.attachments
                for name, data in attachments.items():
                    if name != "summary":
                        writer.attach(name, data)
                writer.attach(
                    "recovered_from",
                    {
                        "path": str(source),
                        "writer": header.get("writer", ""),
                        "created_ns": header.get("created_ns", 0),
                        "integrity": integrity,
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
    return RecoveryResult(rows=rows, segments=segments, attachments=len(attachments), integrity=integrity)
