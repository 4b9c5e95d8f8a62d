"""The messages of the wire (spec: ``docs/protocol.md``): constructors and validators.

Validators raise :class:`MalformedFrameError` (:class:`HandshakeError` for the hello); unknown kinds pass
through, so the protocol grows by adding kinds and fields, never by changing them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from traceml import names
from traceml.errors import HandshakeError, MalformedFrameError
from traceml.transport.codec import WireTable, check_wire_table
from traceml.transport.identity import RankIdentity

#: version of the message set; a hello with another version is refused
PROTOCOL_VERSION = 1

HELLO = "hello"
BATCH = "batch"
ATTACHMENT = "attachment"
HEARTBEAT = "heartbeat"
RANK_FINISHED = "rank_finished"
KINDS: frozenset[str] = frozenset([HELLO, BATCH, ATTACHMENT, HEARTBEAT, RANK_FINISHED])

#: the values of rank_finished's "status"
FINISH_STATUSES: tuple[str, ...] = ("ok", "failed")

_IDENTITY_INTS = ("rank", "local_rank", "world_size", "local_world_size", "node_rank", "pid")


# --- constructors -------------------------------------------------------------------


def hello(run_id: str, token: str, identity: RankIdentity, proto: int = PROTOCOL_VERSION) -> dict[str, Any]:
    """The first message on every connection: who is talking and the run's token."""
    return {"kind": HELLO, "proto": proto, "run_id": run_id, "token": token, **identity.to_dict()}


def batch(seq: int, tables: Mapping[str, WireTable], drops: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Rows of several tables: ``tables`` maps a table name to :func:`encode_columns` output;
    ``drops`` maps a table name to the rows lost so far (cumulative)."""
    return {
        "kind": BATCH,
        "seq": int(seq),
        "tables": dict(tables),
        "drops": {k: int(v) for k, v in (drops or {}).items()},
    }


def attachment(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A named msgpack-able map: ``environment/rank<N>``, ``summary``, ``exit``..."""
    return {"kind": ATTACHMENT, "name": str(name), "data": dict(data)}


def heartbeat(ts_ns: int | None = None) -> dict[str, Any]:
    return {"kind": HEARTBEAT, "ts_ns": time.time_ns() if ts_ns is None else int(ts_ns)}


def rank_finished(status: str, drops: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The rank's last message: ``status`` is ``"ok"`` or ``"failed"``; ``drops`` as in :func:`batch`."""
    if status not in FINISH_STATUSES:
        raise MalformedFrameError(f"rank_finished status {status!r}; expected one of {FINISH_STATUSES}")
    return {"kind": RANK_FINISHED, "status": status, "drops": {k: int(v) for k, v in (drops or {}).items()}}


# --- validators ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """A validated hello."""

    proto: int
    run_id: str
    token: str
    identity: RankIdentity


def _field(msg: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    value = msg.get(key)
    # bool is an int subclass; no field of the protocol is a bool
    if not isinstance(value, types) or isinstance(value, bool):
        raise MalformedFrameError(
            f"{msg.get('kind')} message has {key!r} = {value!r:.60} ({type(value).__name__}); expected {what}"
        )
    return value


def _drops(msg: Mapping[str, Any]) -> None:
    drops = msg.get("drops", {})
    if not isinstance(drops, dict):
        raise MalformedFrameError(
            f"{msg.get('kind')} message has 'drops' of type {type(drops).__name__}; expected a map table -> rows"
        )
    for table, rows in drops.items():
        if not isinstance(table, str) or type(rows) is not int or rows < 0:
            raise MalformedFrameError(
                f"{msg.get('kind')} message has drops entry {table!r:.40}: {rows!r:.40}; expected str -> int >= 0"
            )


def parse_hello(msg: Any) -> Hello:
    """Validate a hello's fields; :class:`HandshakeError` when it is missing or ill-typed.

    The token and the protocol version are only *read* here; the server compares them.
    """
    if not isinstance(msg, dict) or msg.get("kind") != HELLO:
        kind = msg.get("kind") if isinstance(msg, dict) else type(msg).__name__
        raise HandshakeError(f"first message is {kind!r:.40}; expected a hello (rank identity, run id and token)")
    try:
        proto = _field(msg, "proto", int, "the protocol version (int)")
        run_id = _field(msg, "run_id", str, "the run id (str)")
        token = _field(msg, "token", str, "the run's token (str)")
        host = _field(msg, "host", str, "the host name (str)")
        ints = {k: _field(msg, k, int, "an int") for k in _IDENTITY_INTS}
    except MalformedFrameError as exc:
        raise HandshakeError(f"invalid hello: {exc}") from exc
    problem = names.label_problem(host, "the host name")
    if problem is not None:
        raise HandshakeError(f"invalid hello: {problem}")
    identity = RankIdentity(host=host, **ints)
    if identity.rank < 0 or identity.world_size < 1 or identity.local_rank < 0 or identity.node_rank < 0:
        raise HandshakeError(f"invalid hello: impossible rank identity {identity}; expected rank >= 0, world_size >= 1")
    return Hello(proto=proto, run_id=run_id, token=token, identity=identity)


def validate_message(msg: Any) -> dict[str, Any]:
    """Check a decoded message's field types; returns it unchanged.

    Kinds this version does not know are returned as they are (callers skip them); a hello is
    checked by :func:`parse_hello`.
    """
    if not isinstance(msg, dict):
        raise MalformedFrameError(f"message is a {type(msg).__name__}; expected a map with a 'kind' key")
    kind = msg.get("kind")
    if not isinstance(kind, str):
        raise MalformedFrameError(f"message has 'kind' {kind!r:.60}; expected a str")
    if kind == BATCH:
        _field(msg, "seq", int, "a sequence number (int)")
        tables = msg.get("tables")
        if not isinstance(tables, dict):
            raise MalformedFrameError(
                f"batch message has 'tables' of type {type(tables).__name__}; expected a map table -> columns"
            )
        for name, wire in tables.items():
            if not isinstance(name, str) or not name:
                raise MalformedFrameError(f"batch has a table named {name!r:.40}; expected a non-empty str")
            check_wire_table(name, wire)
        _drops(msg)
    elif kind == ATTACHMENT:
        name = _field(msg, "name", str, "the attachment name (str)")
        if not name:
            raise MalformedFrameError("attachment message has an empty 'name'; expected e.g. 'summary'")
        _field(msg, "data", dict, "a map")
    elif kind == HEARTBEAT:
        _field(msg, "ts_ns", int, "wall-clock nanoseconds (int)")
    elif kind == RANK_FINISHED:
        status = msg.get("status")
        if status not in FINISH_STATUSES:
            raise MalformedFrameError(
                f"rank_finished message has status {status!r:.40}; expected one of {FINISH_STATUSES}"
            )
        _drops(msg)
    elif kind == HELLO:
        parse_hello(msg)
    return msg


def batch_rows(msg: Mapping[str, Any]) -> dict[str, int]:
    """Rows per table in a batch (reads each table's ``"n"``; tolerant of odd shapes)."""
    tables = msg.get("tables")
    if msg.get("kind") != BATCH or not isinstance(tables, Mapping):
        return {}
    out: dict[str, int] = {}
    for name, wire in tables.items():
        n = wire.get("n") if isinstance(wire, Mapping) else None
        if isinstance(n, int) and n > 0:
            out[str(name)] = n
    return out
