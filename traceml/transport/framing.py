"""Frames on the wire: a 4-byte big-endian length, then one msgpack map with a ``"kind"`` key.
The only msgpack code of the transport room: every length and every decoded object count is bounded
before memory is spent on it (docs/internals.md, "Transport").
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import msgpack

from traceml.config import (
    DECODE_BASE_OBJECTS,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_OBJECTS_PER_KIB,
    ENV_MAX_FRAME_MB,
    ENV_MAX_OBJECTS_PER_KIB,
    max_objects_per_kib_from_env,
)
from traceml.errors import ConfigError, DecodeBudgetError, FrameTooLargeError, MalformedFrameError, TransportError

#: the length prefix: unsigned 32-bit big-endian payload length
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


#: what to change when a frame is over the limit
RAISE_FRAME_LIMIT = f"raise it with {ENV_MAX_FRAME_MB} (or --max-frame-mb), or send smaller batches"


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack extension type {code} is not allowed on the traceml wire")


def encode_frame(msg: Mapping[str, Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Pack ``msg`` (a map with a ``"kind"`` key) into one length-prefixed frame.

    Raises :class:`MalformedFrameError` when ``msg`` holds something msgpack cannot carry
    (numpy arrays must go through :func:`traceml.transport.codec.encode_columns` first) and
    :class:`FrameTooLargeError` when the frame would exceed ``max_frame_bytes``.
    """
    if not isinstance(msg, Mapping) or not isinstance(msg.get("kind"), str):
        raise MalformedFrameError(f"a frame must be a map with a str 'kind' key; found {type(msg).__name__}")
    try:
        payload = msgpack.packb(msg, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedFrameError(
            f"message of kind {msg.get('kind')!r} cannot be packed ({exc}); expected only dict, list, str, "
            "bytes, int, float, bool and None (encode numpy columns with encode_columns)"
        ) from exc
    if len(payload) > max_frame_bytes:
        raise FrameTooLargeError(
            len(payload), max_frame_bytes, setting=RAISE_FRAME_LIMIT, detail=f"(kind {msg.get('kind')!r})"
        )
    return HEADER.pack(len(payload)) + payload


class _OverBudget(Exception):
    """Raised inside msgpack's hooks when a frame decodes to more objects than its budget."""


def decode_budget(size: int, max_objects_per_kib: int = DEFAULT_MAX_OBJECTS_PER_KIB) -> int:
    """Objects (containers + items + map keys) a frame of *size* bytes may decode to."""
    return DECODE_BASE_OBJECTS + size * max_objects_per_kib // 1024


def _budget_error(size: int, budget: int, per_kib: int) -> DecodeBudgetError:
    return DecodeBudgetError(size, budget, base=DECODE_BASE_OBJECTS, per_kib=per_kib, setting=ENV_MAX_OBJECTS_PER_KIB)


def decode_payload(
    payload: bytes | bytearray | memoryview, max_objects_per_kib: int = DEFAULT_MAX_OBJECTS_PER_KIB
) -> dict[str, Any]:
    """Decode one frame payload into a message map, bounded by the payload's own size: no
    string, array or map longer than the frame, and at most :func:`decode_budget` objects."""
    size = len(payload)
    budget = decode_budget(size, max_objects_per_kib)
    left = [budget]

    def count_list(items: list[Any]) -> list[Any]:
        left[0] -= 1 + len(items)
        if left[0] < 0:
            raise _OverBudget
        return items

    def count_map(items: dict[str, Any]) -> dict[str, Any]:
        left[0] -= 1 + 2 * len(items)
        if left[0] < 0:
            raise _OverBudget
        return items

    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            list_hook=count_list,
            object_hook=count_map,
            max_bin_len=size,
            max_str_len=size,
            # one container is never allowed more items than the whole budget: refused at its header
            max_array_len=min(size, budget),
            max_map_len=min(size // 2, budget // 2),
            max_ext_len=0,
        )
    except _OverBudget:
        raise _budget_error(size, budget, max_objects_per_kib) from None
    except Exception as exc:  # msgpack raises ValueError, UnicodeDecodeError, StackError, ExtraData, ...
        if "exceeds max_array_len" in str(exc) or "exceeds max_map_len" in str(exc):
            raise _budget_error(size, budget, max_objects_per_kib) from exc
        raise MalformedFrameError(
            f"frame of {size} bytes does not decode as one msgpack map ({type(exc).__name__}: {exc}); "
            "expected a traceml message — is the peer a traceml rank of the same version?"
        ) from exc
    if not isinstance(obj, dict):
        raise MalformedFrameError(f"frame decodes to {type(obj).__name__}; expected a map with a 'kind' key")
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise MalformedFrameError(f"message has 'kind' {kind!r:.80}; expected a str such as 'batch'")
    return obj


class FrameDecoder:
    """Incremental frame reader for one connection: feed it bytes as they arrive.

    ``feed`` returns the complete messages (zero or more) and keeps the partial tail;
    ``iter_feed`` yields them one by one, so that a receiver handles the good frames that precede
    a bad one.  A length prefix over ``max_frame_bytes`` raises :class:`FrameTooLargeError` as
    soon as its 4 bytes are seen (the frame's bytes are never buffered); a payload that is not a
    message raises :class:`MalformedFrameError`.  After an error the decoder stays failed: the
    stream has lost its framing, so the connection must be closed.  ``max_frame_bytes`` may be
    changed between feeds (the server keeps it small until the hello has been accepted).
    """

    __slots__ = ("max_frame_bytes", "max_objects_per_kib", "_buf", "_pos", "_failed", "frames", "bytes_fed")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, max_objects_per_kib: int | None = None) -> None:
        if max_frame_bytes < 1:
            raise ConfigError(
                f"max_frame_bytes={max_frame_bytes}: expected a limit of at least 1 byte ({ENV_MAX_FRAME_MB})"
            )
        self.max_frame_bytes = max_frame_bytes
        #: the decode budget (objects per KiB of a frame); None: TRACEML_MAX_OBJECTS_PER_KIB or 64
        self.max_objects_per_kib = (
            max_objects_per_kib_from_env() if max_objects_per_kib is None else max_objects_per_kib
        )
        self._buf = bytearray()
        self._pos = 0
        self._failed: TransportError | None = None
        self.frames = 0
        self.bytes_fed = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (a partial frame)."""
        return len(self._buf) - self._pos

    @property
    def failed(self) -> TransportError | None:
        return self._failed

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        return list(self.iter_feed(data))

    def iter_feed(self, data: bytes | bytearray | memoryview) -> Iterator[dict[str, Any]]:
        if self._failed is not None:
            raise self._failed.within("decoder already failed")
        self.bytes_fed += len(data)
        self._buf += data
        return self._drain()

    def _drain(self) -> Iterator[dict[str, Any]]:
        while (msg := self._next()) is not None:
            yield msg

    def _next(self) -> dict[str, Any] | None:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self.max_frame_bytes:
                self._fail(FrameTooLargeError(length, self.max_frame_bytes, setting=RAISE_FRAME_LIMIT))
            if avail - HEADER_SIZE >= length:
                start = pos + HEADER_SIZE
                try:
                    msg = decode_payload(memoryview(buf)[start : start + length], self.max_objects_per_kib)
                except TransportError as exc:
                    self._fail(exc)
                self._pos = start + length
                self.frames += 1
                return msg
        if pos:  # keep only the partial tail
            del buf[:pos]
            self._pos = 0
        return None

    def _fail(self, exc: TransportError) -> NoReturn:
        self._failed = exc
        self._buf = bytearray()
        self._pos = 0
        raise exc
