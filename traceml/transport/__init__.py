"""The TCP wire between ranks and the aggregator (spec: ``docs/protocol.md``): ranks send with
:class:`TelemetryClient`, the aggregator serves them with :class:`TelemetryServer`.  Consumers import
through this face; it imports only leaves, never format or store.
"""

from traceml.transport.client import TelemetryClient
from traceml.transport.codec import WireTable, check_wire_table, decode_columns, decode_tables, encode_columns
from traceml.transport.framing import HEADER_SIZE, FrameDecoder, decode_payload, encode_frame
from traceml.transport.identity import RankIdentity, rank_identity_from_env
from traceml.transport.messages import (
    ATTACHMENT,
    BATCH,
    HEARTBEAT,
    HELLO,
    KINDS,
    PROTOCOL_VERSION,
    RANK_FINISHED,
    Hello,
    attachment,
    batch,
    batch_rows,
    heartbeat,
    hello,
    parse_hello,
    rank_finished,
    validate_message,
)
from traceml.transport.server import (
    CLOSE_EOF,
    CLOSE_ERROR,
    CLOSE_MALFORMED,
    CLOSE_STOPPED,
    CLOSE_TOO_LARGE,
    BaseHandler,
    Connection,
    ConnInfo,
    ServerHandler,
    TelemetryServer,
    listening_socket,
)

__all__ = [
    "ATTACHMENT",
    "BATCH",
    "CLOSE_EOF",
    "CLOSE_ERROR",
    "CLOSE_MALFORMED",
    "CLOSE_STOPPED",
    "CLOSE_TOO_LARGE",
    "HEADER_SIZE",
    "HEARTBEAT",
    "HELLO",
    "KINDS",
    "PROTOCOL_VERSION",
    "RANK_FINISHED",
    "BaseHandler",
    "ConnInfo",
    "Connection",
    "FrameDecoder",
    "Hello",
    "RankIdentity",
    "ServerHandler",
    "TelemetryClient",
    "TelemetryServer",
    "WireTable",
    "attachment",
    "batch",
    "batch_rows",
    "check_wire_table",
    "decode_columns",
    "decode_payload",
    "decode_tables",
    "encode_columns",
    "encode_frame",
    "heartbeat",
    "hello",
    "listening_socket",
    "parse_hello",
    "rank_finished",
    "rank_identity_from_env",
    "validate_message",
]
