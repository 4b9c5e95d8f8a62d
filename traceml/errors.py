"""The one exception tree of traceml.

Every error traceml raises on purpose derives from :class:`TracemlError`; foreign
errors (zstd, msgpack, OSError, socket) are translated at each room's boundary
with ``raise ... from``.  Messages say what was expected, what was found, where,
and what to change.

    TracemlError
    +-- ConfigError                 bad option / environment value
    +-- FormatError                 the .tml file (traceml.format)
    |   +-- NotATmlFileError        wrong magic bytes
    |   +-- UnsupportedVersionError file written by a newer major version
    |   +-- CorruptRecordError      CRC mismatch, bad kind, undecodable payload
    |   +-- RecordTooLargeError     declared length over the limit (never allocated)
    |   +-- DecompressionBombError  decompressed size over the cap
    |   +-- TruncatedFileError      file ends inside a record
    |   +-- WriterClosedError       append after close / writer failed
    +-- TransportError              the TCP wire (traceml.transport)
    |   +-- FrameTooLargeError      frame length over the limit (never allocated)
    |   +-- MalformedFrameError     undecodable or ill-typed message
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


class TracemlError(Exception):
    """Base class of every error traceml raises on purpose."""


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
    """A declared record length exceeds the configured limit."""


class DecompressionBombError(FormatError):
    """A compressed payload would expand beyond the decompression cap."""


class TruncatedFileError(FormatError):
    """The file ends in the middle of a record."""


class WriterClosedError(FormatError):
    """The writer was closed, or failed earlier and refuses further appends."""


class TransportError(TracemlError):
    """Problem on the telemetry wire."""


class FrameTooLargeError(TransportError):
    """A frame's length prefix exceeds the configured limit."""


class MalformedFrameError(TransportError):
    """A frame does not decode to a well-formed message."""


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
