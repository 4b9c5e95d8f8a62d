"""The one exception tree of traceml.

Every error traceml raises on purpose derives from :class:`TracemlError`; foreign errors are
translated at each room's boundary with ``raise ... from``.

    TracemlError
    +-- ConfigError                 bad option / environment value
    +-- FormatError                 the .tml file (traceml.format)
    |   +-- NotATmlFileError        wrong magic bytes
    |   +-- UnsupportedVersionError file written by a newer major version
    |   +-- CorruptRecordError      CRC mismatch, bad kind, undecodable payload
    |   +-- RecordTooLargeError     declared length over the limit (never allocated)
    |   +-- DecompressionBombError  decompressed size over the cap
    |   +-- ReadLimitError          a count a file declares over a reader limit (objects, columns, ...)
    |   +-- TruncatedFileError      file ends inside a record
    |   +-- WriterClosedError       append after close / writer failed
    +-- TransportError              the TCP wire (traceml.transport)
    |   +-- FrameTooLargeError      frame length over the limit (never allocated)
    |   +-- MalformedFrameError     undecodable or ill-typed message
    |   |   +-- DecodeBudgetError   a frame decodes to more objects than its budget
    |   +-- HandshakeError          missing/invalid hello, wrong token or version
    +-- StoreError                  stores and store views (traceml.store)
    +-- ReplayError                 reading recordings back (replay)
    +-- ReportError                 reports and comparisons (replay.report / compare)
    +-- OutputError                 an output path that cannot be used (traceml.outpaths)
    |   +-- OutputExistsError       the file exists and --overwrite was not given
    +-- ExportError                 exporting to Prometheus, OTLP, W&B, MLflow (traceml.exports)
    +-- MissingDependencyError      an optional extra is not installed (with hint)
"""

from __future__ import annotations

from typing import Any, TypeVar

_E = TypeVar("_E", bound="TracemlError")


def _limit(n: int) -> str:
    """A limit as people read it: ``64 MiB`` from 1 MiB up, else ``2000-byte``."""
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n}-byte"


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.4g} MiB"


class TracemlError(Exception):
    """Base class of every error traceml raises on purpose."""

    def within(self: _E, context: str) -> _E:
        """This error, same type and fields, with *context* (where it happened) before its message."""
        wider = type(self).__new__(type(self))
        wider.__dict__.update(self.__dict__)
        Exception.__init__(wider, f"{context}: {self}")
        return wider

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from the message and the fields, whatever the subclass's __init__ takes
        return _rebuild, (type(self), str(self), dict(self.__dict__))


def _rebuild(cls: type[TracemlError], message: str, fields: dict[str, Any]) -> TracemlError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(fields)
    return error


class ConfigError(TracemlError):
    """An option or environment variable has a value traceml cannot use."""


class FormatError(TracemlError):
    """Problem reading or writing a ``.tml`` recording."""


class NotATmlFileError(FormatError):
    """The file does not start with the ``.tml`` magic bytes."""


class UnsupportedVersionError(FormatError):
    """The file's major format version is newer than this reader's."""


class CorruptRecordError(FormatError):
    """A record failed its CRC, has an impossible layout, or does not decode."""


class RecordTooLargeError(FormatError):
    """A record length exceeds the record limit: one read from the file at ``offset`` (declared,
    never allocated), or one about to be written (``offset`` None).  ``setting`` says what to change."""

    def __init__(self, kind: str, length: int, limit: int, *, offset: int | None = None, setting: str) -> None:
        self.kind, self.length, self.limit, self.offset, self.setting = kind, length, limit, offset, setting
        if offset is None:
            message = f"a {kind} record of {length} bytes exceeds the {_limit(limit)} record limit; {setting}"
        else:
            message = (
                f"{kind} record at byte {offset} declares {length} bytes, over the {_limit(limit)} record limit"
                f" ({setting})"
            )
        super().__init__(message)


class DecompressionBombError(FormatError):
    """A compressed payload would expand beyond the cap (``limit``), or, with ``declared``, beyond
    the size its segment declares (``limit``); ``length`` is what it would expand to, when known."""

    def __init__(
        self,
        what: str,
        length: int | None,
        limit: int,
        *,
        declared: bool = False,
        offset: int | None = None,
        setting: str = "",
    ) -> None:
        self.what, self.length, self.limit, self.declared = what, length, limit, declared
        self.offset, self.setting = offset, setting
        where = "" if offset is None else f" at byte {offset}"
        if not declared:
            message = f"{what}{where} declares {length} decompressed bytes, over the {_limit(limit)} cap"
            message += f" ({setting})" if setting else ""
        elif length is not None:
            message = f"{what}{where} would expand to {length} bytes; the segment head declares {limit}"
        else:
            message = f"{what}{where} expands beyond the {limit} bytes its segment declares"
        super().__init__(message)


class ReadLimitError(FormatError):
    """Something a recording declares (msgpack objects in a record, bytes a segment decodes to,
    tables, columns, ranks, segments) is over the reader's limit ``limit`` (``ReadLimits.<setting>``);
    checked before anything of that size is allocated.  ``found`` is the count declared."""

    def __init__(self, what: str, found: int, limit: int, *, setting: str, offset: int | None = None) -> None:
        self.what, self.found, self.limit, self.setting, self.offset = what, found, limit, setting, offset
        where = "" if offset is None else f" at byte {offset}"
        super().__init__(
            f"{what}{where}: {found} found, over the reader's limit of {limit}"
            f" (raise ReadLimits.{setting} only for a file you trust)"
        )


class TruncatedFileError(FormatError):
    """The file ends in the middle of a record."""


class WriterClosedError(FormatError):
    """The writer was closed, or failed earlier and refuses further appends."""


class TransportError(TracemlError):
    """Problem on the telemetry wire."""


class FrameTooLargeError(TransportError):
    """A frame (or, with ``buffered``, a connection's unread bytes) over its limit; the length is
    never allocated.  ``rank`` is the sender's when known, ``setting`` what to change."""

    def __init__(
        self,
        length: int,
        limit: int,
        *,
        setting: str,
        rank: int | None = None,
        detail: str = "",
        buffered: bool = False,
    ) -> None:
        self.length, self.limit, self.setting, self.rank = length, limit, setting, rank
        self.detail, self.buffered = detail, buffered
        origin = "".join(f" {part}" for part in (detail, "" if rank is None else f"from rank {rank}") if part)
        if buffered:
            message = f"{length} bytes buffered{origin} exceed the per-connection bound of {limit} bytes ({setting})"
        else:
            message = (
                f"frame of {length} bytes ({_mib(length)}){origin} exceeds the {limit}-byte ({_mib(limit)})"
                f" frame limit; {setting}"
            )
        super().__init__(message)

    def from_rank(self, rank: int | None) -> FrameTooLargeError:
        """The same error naming the rank that sent the frame (the decoder does not know it)."""
        if rank is None or self.rank is not None:
            return self
        return FrameTooLargeError(
            self.length, self.limit, setting=self.setting, rank=rank, detail=self.detail, buffered=self.buffered
        )


class MalformedFrameError(TransportError):
    """A frame does not decode to a well-formed message."""


class DecodeBudgetError(MalformedFrameError):
    """A frame of ``length`` bytes decodes to more than ``budget`` objects (``base`` + ``per_kib`` per
    KiB: containers, items and map keys); ``setting`` is the variable that raises ``per_kib``."""

    def __init__(self, length: int, budget: int, *, base: int, per_kib: int, setting: str) -> None:
        self.length, self.budget, self.base, self.per_kib, self.setting = length, budget, base, per_kib, setting
        super().__init__(
            f"frame of {length} bytes decodes to more than {budget} objects, its decode budget"
            f" ({base} + {per_kib} per KiB: containers, items and map keys); a traceml batch"
            f" carries its numbers as bytes and stays far below it. If a real rank hits this, raise"
            f" {setting} (now {per_kib})"
        )


class HandshakeError(TransportError):
    """The hello frame is missing, malformed, or carries the wrong token or version."""


class StoreError(TracemlError):
    """Problem with a live store or store view."""


class ReplayError(TracemlError):
    """Problem reading a recording back."""


class ReportError(TracemlError):
    """Problem building a report or a comparison."""


class OutputError(TracemlError):
    """An output path cannot be written: not a directory, a symbolic link, or not writable."""


class OutputExistsError(OutputError):
    """The output file exists and replacing it was not asked for (``--overwrite``)."""


class ExportError(TracemlError):
    """Problem exporting a run to another tool (Prometheus file, OTLP endpoint, W&B, MLflow)."""


class MissingDependencyError(TracemlError):
    """An optional dependency is missing; the message says what to install."""
