"""Unit tests of the column codec, the message constructors/validators and rank identity."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from traceml.errors import ConfigError, HandshakeError, MalformedFrameError
from traceml.schema import NUMPY_DTYPES, PROCESS, STEP_REGION, STEP_TIME, rows_to_columns, table
from traceml.transport import (
    FrameDecoder,
    RankIdentity,
    attachment,
    batch,
    batch_rows,
    decode_columns,
    decode_tables,
    encode_columns,
    encode_frame,
    heartbeat,
    hello,
    parse_hello,
    rank_finished,
    rank_identity_from_env,
    validate_message,
)

MIXED = table("custom_things", ("a", "i8"), ("b", "i4"), ("c", "u1"), ("d", "f8"), ("e", "f4"), ("label", "str"))


def _mixed_columns(n: int) -> dict:
    rng = np.random.default_rng(n)
    return {
        "a": rng.integers(-(2**62), 2**62, n),
        "b": rng.integers(-(2**31), 2**31 - 1, n).astype(np.int32),
        "c": rng.integers(0, 255, n).astype(np.uint8),
        "d": rng.normal(size=n),
        "e": rng.normal(size=n).astype(np.float32),
        "label": [f"row-{i}-é" for i in range(n)],
    }


def test_columns_round_trip_through_a_frame_for_every_type_code() -> None:
    cols = _mixed_columns(50)
    cols["d"][3] = np.nan
    wire = encode_columns(MIXED, cols)
    msg = FrameDecoder().feed(encode_frame(batch(1, {MIXED.name: wire})))[0]
    schema, out = decode_columns(msg["tables"][MIXED.name], MIXED.name)
    assert schema == MIXED  # the schema travels with the data: an unknown table decodes
    for name in ("a", "b", "c", "d", "e"):
        assert out[name].dtype == NUMPY_DTYPES[MIXED.columns[MIXED.names.index(name)].dtype]
        np.testing.assert_array_equal(out[name], cols[name])
    assert out["label"] == cols["label"]


def test_numeric_payload_is_little_endian_raw_bytes() -> None:
    wire = encode_columns(table("t", ("x", "i4")), {"x": [1, 256]})
    assert wire == {"n": 2, "cols": {"x": ["i4", b"\x01\x00\x00\x00\x00\x01\x00\x00"]}}


def test_big_endian_input_is_stored_little_endian() -> None:
    wire = encode_columns(table("t", ("x", "i8")), {"x": np.array([1, 2], dtype=">i8")})
    _, out = decode_columns(wire)
    assert out["x"].tolist() == [1, 2]


def test_empty_table_round_trips() -> None:
    _, out = decode_columns(encode_columns(STEP_REGION, rows_to_columns(STEP_REGION, [])))
    assert len(out["step"]) == 0 and out["name"] == []


@settings(max_examples=80, deadline=None)
@given(data=st.data(), code=st.sampled_from(["i8", "i4", "u1", "f8", "f4"]))
def test_numeric_columns_round_trip(data: st.DataObject, code: str) -> None:
    values = data.draw(hnp.arrays(NUMPY_DTYPES[code], st.integers(0, 200)))
    _, out = decode_columns(encode_columns(table("t", ("v", code)), {"v": values}))
    assert out["v"].dtype == NUMPY_DTYPES[code]
    np.testing.assert_array_equal(out["v"], values)  # nan == nan here


def test_encode_refuses_columns_that_do_not_match_the_schema() -> None:
    cols = rows_to_columns(PROCESS, [(1, 2.0, 3, 4, 5, 6, 7, 8)])
    with pytest.raises(MalformedFrameError, match="missing"):
        encode_columns(PROCESS, {k: v for k, v in cols.items() if k != "fds"})
    with pytest.raises(MalformedFrameError, match="same length"):
        encode_columns(PROCESS, {**cols, "fds": np.array([1, 2], dtype=np.int32)})
    with pytest.raises(MalformedFrameError, match="cannot be stored as i8"):
        encode_columns(table("t", ("x", "i8")), {"x": ["not a number"]})
    with pytest.raises(MalformedFrameError, match="1-D"):
        encode_columns(table("t", ("x", "i8")), {"x": np.zeros((2, 2))})


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ([], "expected a map"),
        ({"n": 1}, "'cols'"),
        ({"n": -1, "cols": {"x": ["i8", b"\x00" * 8]}}, "row count"),
        ({"n": True, "cols": {"x": ["i8", b"\x00" * 8]}}, "row count"),
        ({"n": 1, "cols": {}}, "non-empty"),
        ({"n": 1, "cols": {"x": ["i16", b"\x00" * 8]}}, "type code"),
        ({"n": 1, "cols": {"x": ["i8", b"\x00" * 7]}}, "multiple of 8"),
        ({"n": 2, "cols": {"x": ["i8", b"\x00" * 8]}}, "expected n = 2"),
        ({"n": 1, "cols": {"x": ["i8", [1]]}}, "little-endian bytes"),
        ({"n": 1, "cols": {"x": ["str", [1]]}}, "only str"),
        ({"n": 1, "cols": {"x": ["str", "abc"]}}, "list of str"),
        ({"n": 2, "cols": {"x": ["str", ["a"]]}}, "expected n = 2"),
        ({"n": 1, "cols": {"x": ["i8"]}}, r"\[dtype, payload\]"),
        ({"n": 1, "cols": {"": ["i8", b"\x00" * 8]}}, "non-empty str"),
        ({"n": 1, "cols": {"x": ["i8", b"\x00" * 8], "y": ["u1", b"\x00\x00"]}}, "expected n = 1"),
    ],
)
def test_decode_validates_every_length_and_type(wire: object, match: str) -> None:
    with pytest.raises(MalformedFrameError, match=match):
        decode_columns(wire, "t")
    with pytest.raises(MalformedFrameError, match=match):
        validate_message({"kind": "batch", "seq": 1, "tables": {"t": wire}, "drops": {}})


def test_decode_tables_decodes_several_tables_of_one_batch() -> None:
    st_cols = rows_to_columns(STEP_TIME, [(i, i, 0, 9, 1, 1, 1, 1, 1, 4) for i in range(3)])
    msg = batch(
        4,
        {"step_time": encode_columns(STEP_TIME, st_cols), "custom_things": encode_columns(MIXED, _mixed_columns(2))},
        {"step_time": 7},
    )
    assert batch_rows(msg) == {"step_time": 3, "custom_things": 2}
    decoded = decode_tables(FrameDecoder().feed(encode_frame(msg))[0]["tables"])
    assert decoded["step_time"][0] == STEP_TIME
    assert decoded["step_time"][1]["step"].tolist() == [0, 1, 2]
    assert decoded["custom_things"][0].names == MIXED.names


# --- messages -----------------------------------------------------------------------

IDENTITY = RankIdentity(rank=3, local_rank=1, world_size=8, local_world_size=2, node_rank=1, host="n1", pid=99)


def test_constructors_build_messages_their_validators_accept() -> None:
    wire = encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, [(1, 2, 0, 3, 4, 5, 6, 7, 8, 9)]))
    for msg in (
        batch(1, {"step_time": wire}, {"step_time": 2}),
        attachment("environment/rank3", {"python": "3.11", "n": 1}),
        heartbeat(),
        rank_finished("failed", {"process": 1}),
        {"kind": "something_newer", "payload": 1},
    ):
        assert validate_message(FrameDecoder().feed(encode_frame(msg))[0]) == msg
    h = parse_hello(hello("run-1", "secret", IDENTITY))
    assert h.identity == IDENTITY and h.proto == 1 and h.run_id == "run-1" and h.token == "secret"


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        ({"kind": "batch", "seq": "1", "tables": {}}, "'seq'"),
        ({"kind": "batch", "seq": True, "tables": {}}, "'seq'"),
        ({"kind": "batch", "seq": 1, "tables": []}, "'tables'"),
        ({"kind": "batch", "seq": 1, "tables": {}, "drops": {"t": -1}}, "drops"),
        ({"kind": "batch", "seq": 1, "tables": {}, "drops": [1]}, "drops"),
        ({"kind": "attachment", "name": "", "data": {}}, "empty"),
        ({"kind": "attachment", "name": "x", "data": [1]}, "'data'"),
        ({"kind": "heartbeat", "ts_ns": 1.5}, "'ts_ns'"),
        ({"kind": "rank_finished", "status": "maybe", "drops": {}}, "status"),
        ([1], "expected a map"),
    ],
)
def test_validators_reject_ill_typed_fields(msg: object, match: str) -> None:
    with pytest.raises(MalformedFrameError, match=match):
        validate_message(msg)


def test_rank_finished_constructor_checks_status() -> None:
    with pytest.raises(MalformedFrameError, match="ok"):
        rank_finished("done")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kind": "batch"}, "expected a hello"),
        ({"token": None}, "'token'"),
        ({"rank": "3"}, "'rank'"),
        ({"proto": 1.0}, "'proto'"),
        ({"rank": -2}, "impossible rank"),
        ({"host": 5}, "'host'"),
    ],
)
def test_parse_hello_rejects_bad_hellos_with_handshake_error(change: dict, match: str) -> None:
    with pytest.raises(HandshakeError, match=match):
        parse_hello({**hello("r", "t", IDENTITY), **change})


# --- identity -----------------------------------------------------------------------


def test_plain_python_is_rank_zero_of_one() -> None:
    ident = rank_identity_from_env({})
    assert (ident.rank, ident.local_rank, ident.world_size, ident.local_world_size, ident.node_rank) == (0, 0, 1, 1, 0)
    assert ident.pid == os.getpid() and ident.host == socket.gethostname()


def test_torchrun_variables_are_read() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    ident = rank_identity_from_env(env)
    assert (ident.rank, ident.local_rank, ident.world_size, ident.local_world_size, ident.node_rank) == (5, 1, 8, 4, 1)
    assert rank_identity_from_env({**env, "GROUP_RANK": "", "NODE_RANK": "2"}).node_rank == 2


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANK": "two"}, "RANK='two': expected an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "not below WORLD_SIZE"),
        ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "RANK": "2"}, "not below LOCAL_WORLD_SIZE"),
        ({"NODE_RANK": "x"}, "NODE_RANK='x'"),
    ],
)
def test_bad_rank_variables_raise_config_error_naming_them(env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        rank_identity_from_env(env)
