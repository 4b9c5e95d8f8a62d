"""The ``.tml`` recording format (spec: ``docs/format.md``), the only room that knows the file's
bytes: :class:`TmlWriter` appends from one thread; :func:`open_recording` reads a closed, crashed,
damaged or growing file and reports what it could not read in ``integrity``.
"""

from __future__ import annotations

from traceml.format._locate import ReadLimits
from traceml.format._records import FORMAT_VERSION, MAGIC, PRIVATE_KINDS, RecordKind, SegmentInfo
from traceml.format.inspect import Batch
from traceml.format.reader import TmlReader, open_recording
from traceml.format.rollup import DEFAULT_ROLLUP_STEPS
from traceml.format.writer import STANDARD, TmlWriter

__all__ = [
    "DEFAULT_ROLLUP_STEPS",
    "FORMAT_VERSION",
    "MAGIC",
    "PRIVATE_KINDS",
    "STANDARD",
    "Batch",
    "ReadLimits",
    "RecordKind",
    "SegmentInfo",
    "TmlReader",
    "TmlWriter",
    "open_recording",
]
