"""Unit and property tests of the frame layer: encode_frame, decode_payload, FrameDecoder."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traceml.config import DEFAULT_MAX_FRAME_BYTES
from traceml.errors import FrameTooLargeError, MalformedFrameError, TransportError
from traceml.schema import STEP_REGION, STEP_TIME, rows_to_columns
from traceml.transport import FrameDecoder, decode_payload, encode_frame
from traceml.transport.codec import encode_columns
from traceml.transport.messages import batch, heartbeat


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _sample_batch(seq: int = 1) -> dict:
    st_cols = rows_to_columns(STEP_TIME, [(i, 10 + i, 0, 100, 1, 2, 3, 4, 5, 6) for i in range(5)])
    reg_cols = rows_to_columns(STEP_REGION, [(1, 11, "attn", 20, 2), (1, 11, "mlp", 30, 1)])
    return batch(
        seq, {"step_time": encode_columns(STEP_TIME, st_cols), "step_region": encode_columns(STEP_REGION, reg_cols)}
    )


def test_encode_frame_is_a_big_endian_length_then_one_msgpack_map() -> None:
    frame = encode_frame({"kind": "heartbeat", "ts_ns": 5})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"kind": "heartbeat", "ts_ns": 5}


def test_frames_round_trip_through_the_decoder_in_one_feed() -> None:
    msgs = [heartbeat(1), _sample_batch(2), {"kind": "future_kind", "x": [1, 2]}]
    out = FrameDecoder().feed(b"".join(encode_frame(m) for m in msgs))
    assert out == msgs


def test_decoder_fed_byte_by_byte_returns_each_frame_once_complete() -> None:
    msgs = [_sample_batch(1), heartbeat(7), _sample_batch(2)]
    data = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        got.extend(dec.feed(data[i : i + 1]))
    assert got == msgs
    assert dec.buffered == 0
    assert dec.frames == 3


def test_encode_frame_refuses_numpy_and_oversize_messages() -> None:
    with pytest.raises(MalformedFrameError, match="encode_columns"):
        encode_frame({"kind": "batch", "x": np.arange(3)})
    with pytest.raises(MalformedFrameError, match="'kind'"):
        encode_frame({"no_kind": 1})
    with pytest.raises(FrameTooLargeError, match="TRACEML_MAX_FRAME_MB"):
        encode_frame({"kind": "attachment", "data": b"x" * 2000}, max_frame_bytes=1000)


def test_oversize_prefix_is_refused_from_the_four_bytes_alone() -> None:
    dec = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    with pytest.raises(FrameTooLargeError) as err:
        dec.feed(struct.pack(">I", 1 << 30))
    text = str(err.value)
    assert "1073741824" in text and "16 MiB" in text and "TRACEML_MAX_FRAME_MB" in text
    assert dec.buffered == 0
    # the stream has lost its framing: the decoder stays failed
    with pytest.raises(FrameTooLargeError):
        dec.feed(b"\x00")


def test_frame_exactly_at_the_limit_is_accepted_one_byte_over_is_not() -> None:
    payload = msgpack.packb({"kind": "attachment", "name": "a", "data": {"b": b"x" * 100}})
    assert FrameDecoder(len(payload)).feed(_frame(payload))[0]["kind"] == "attachment"
    with pytest.raises(FrameTooLargeError):
        FrameDecoder(len(payload) - 1).feed(_frame(payload))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "does not decode"),
        (b"\xc1", "does not decode"),  # never-used msgpack byte
        (msgpack.packb([1, 2, 3]), "expected a map"),
        (msgpack.packb({"kind": 5}), "'kind'"),
        (msgpack.packb({"no": "kind"}), "'kind'"),
        (msgpack.packb({1: "int key", "kind": "x"}), "does not decode"),
        (msgpack.packb({"kind": "x", "e": msgpack.ExtType(5, b"abc")}), "does not decode"),
        (msgpack.packb({"kind": "x", "t": msgpack.Timestamp(1, 2)}), "does not decode"),
        (b"\xdd\xff\xff\xff\xff", "decode budget"),  # array32 declaring 4 G elements
        (b"\xdf\xff\xff\xff\xff", "decode budget"),  # map32 declaring 4 G pairs
        (b"\xdb\xff\xff\xff\xf0abc", "does not decode"),  # str32 declaring 4 GiB
        (b"\xc6\x7f\xff\xff\xffabc", "does not decode"),  # bin32 declaring 2 GiB
        (b"\x91" * 5000 + b"\x00", "does not decode"),  # nesting deeper than the stack
        (msgpack.packb({"kind": "x"}) + b"\x00", "does not decode"),  # trailing bytes
        (b"\x81\xa4kind\xa2\xff\xfe", "does not decode"),  # invalid UTF-8
    ],
)
def test_malformed_payloads_raise_malformed_frame_error(payload: bytes, match: str) -> None:
    with pytest.raises(MalformedFrameError, match=match):
        decode_payload(payload)
    dec = FrameDecoder()
    with pytest.raises(MalformedFrameError):
        dec.feed(_frame(payload))
    assert dec.failed is not None


def test_iter_feed_yields_the_good_frames_before_a_bad_one() -> None:
    data = encode_frame(heartbeat(1)) + encode_frame(heartbeat(2)) + _frame(b"\xc1")
    got = []
    with pytest.raises(MalformedFrameError):
        for msg in FrameDecoder().iter_feed(data):
            got.append(msg["ts_ns"])
    assert got == [1, 2]


# --- properties ---------------------------------------------------------------------

messages = st.lists(
    st.one_of(
        st.builds(heartbeat, st.integers(0, 2**63 - 1)),
        st.builds(
            lambda name, blob, text: {"kind": "attachment", "name": name, "data": {"blob": blob, "text": text}},
            st.text(min_size=1, max_size=20),
            st.binary(max_size=300),
            st.text(max_size=50),
        ),
        st.builds(_sample_batch, st.integers(0, 1000)),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=messages, cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_chunking_of_a_valid_stream_yields_the_same_messages(msgs: list[dict], cuts: list[int]) -> None:
    data = b"".join(encode_frame(m) for m in msgs)
    points = sorted({c % (len(data) + 1) for c in cuts})
    dec = FrameDecoder()
    got: list[dict] = []
    prev = 0
    for p in [*points, len(data)]:
        got.extend(dec.feed(data[prev:p]))
        prev = p
    assert got == msgs
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=2000),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
    limit=st.integers(1, 4096),
)
def test_random_bytes_never_raise_anything_but_transport_errors(data: bytes, cuts: list[int], limit: int) -> None:
    dec = FrameDecoder(limit)
    points = sorted({c % (len(data) + 1) for c in cuts})
    prev = 0
    try:
        for p in [*points, len(data)]:
            for msg in dec.feed(data[prev:p]):
                assert isinstance(msg, dict) and isinstance(msg["kind"], str)
            prev = p
    except TransportError:
        pass
    assert dec.buffered <= limit + 4 + len(data)


@settings(max_examples=200, deadline=None)
@given(
    msgs=messages,
    flip=st.integers(0, 10**9),
    bit=st.integers(0, 7),
    cut=st.integers(0, 10**9),
)
def test_flipped_bits_and_truncation_only_raise_transport_errors(
    msgs: list[dict], flip: int, bit: int, cut: int
) -> None:
    data = bytearray(b"".join(encode_frame(m) for m in msgs))
    data[flip % len(data)] ^= 1 << bit
    data = data[: cut % (len(data) + 1)]
    dec = FrameDecoder(64 * 1024)
    try:
        for msg in dec.feed(bytes(data)):
            assert isinstance(msg, dict)
    except TransportError:
        pass
