"""Columns on the wire: one table's rows as ``{"n": rows, "cols": {name: [dtype, payload]}}``.

The schema travels with the data; every length is checked on decode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from traceml.errors import MalformedFrameError
from traceml.schema import NUMPY_DTYPES, STR, TYPE_CODES, Column, TableSchema

#: one table on the wire: {"n": int, "cols": {name: [dtype, bytes | list[str]]}}
WireTable = dict[str, Any]


def encode_columns(schema: TableSchema, columns: Mapping[str, Any]) -> WireTable:
    """Encode ``columns`` (``{name: ndarray | sequence}``, every column of ``schema``) for a batch."""
    if not schema.columns:
        raise MalformedFrameError(f"table {schema.name!r} has no columns; expected a schema with at least one column")
    missing = [c.name for c in schema.columns if c.name not in columns]
    extra = [name for name in columns if name not in schema.names]
    if missing or extra:
        raise MalformedFrameError(
            f"table {schema.name!r}: columns do not match its schema (missing {missing}, unexpected {extra}); "
            f"expected exactly {list(schema.names)}"
        )
    n: int | None = None
    cols: dict[str, list[Any]] = {}
    for col in schema.columns:
        values = columns[col.name]
        if col.dtype == STR:
            payload: Any = [v if isinstance(v, str) else str(v) for v in values]
            rows = len(payload)
        else:
            try:
                arr = np.ascontiguousarray(values, dtype=NUMPY_DTYPES[col.dtype])
            except (TypeError, ValueError, OverflowError) as exc:
                raise MalformedFrameError(
                    f"column {schema.name}.{col.name} cannot be stored as {col.dtype} ({exc}); "
                    "expected numbers (use -1 or nan for values that were not measured)"
                ) from exc
            if arr.ndim != 1:
                raise MalformedFrameError(
                    f"column {schema.name}.{col.name} has shape {arr.shape}; expected a 1-D column"
                )
            payload = arr.tobytes()
            rows = arr.shape[0]
        if n is None:
            n = rows
        elif rows != n:
            raise MalformedFrameError(
                f"table {schema.name!r}: column {col.name!r} has {rows} rows but earlier columns have {n}; "
                "expected every column to have the same length"
            )
        cols[col.name] = [col.dtype, payload]
    return {"n": n or 0, "cols": cols}


def check_wire_table(name: str, wire: Any) -> int:
    """Validate one wire table's shape and lengths without decoding it; returns its row count."""
    if not isinstance(wire, dict):
        raise MalformedFrameError(f"table {name!r} is a {type(wire).__name__}; expected a map with 'n' and 'cols'")
    n = wire.get("n")
    cols = wire.get("cols")
    if type(n) is not int or n < 0:
        raise MalformedFrameError(f"table {name!r} has 'n' = {n!r:.40}; expected a row count (int >= 0)")
    if not isinstance(cols, dict) or not cols:
        raise MalformedFrameError(f"table {name!r} has 'cols' of type {type(cols).__name__}; expected a non-empty map")
    for cname, spec in cols.items():
        if not isinstance(cname, str) or not cname:
            raise MalformedFrameError(f"table {name!r} has a column named {cname!r:.40}; expected a non-empty str")
        if not isinstance(spec, list) or len(spec) != 2:
            raise MalformedFrameError(f"column {name}.{cname} is {spec!r:.60}; expected [dtype, payload]")
        dtype, payload = spec
        if dtype not in TYPE_CODES:
            raise MalformedFrameError(
                f"column {name}.{cname} has type code {dtype!r:.40}; expected one of {sorted(TYPE_CODES)}"
            )
        if dtype == STR:
            if not isinstance(payload, list):
                raise MalformedFrameError(
                    f"column {name}.{cname} (str) carries {type(payload).__name__}; expected a list of str"
                )
            if len(payload) != n:
                raise MalformedFrameError(f"column {name}.{cname} has {len(payload)} values; expected n = {n}")
            for v in payload:
                if type(v) is not str:
                    raise MalformedFrameError(
                        f"column {name}.{cname} (str) holds a {type(v).__name__}; expected only str values"
                    )
        else:
            if not isinstance(payload, bytes):
                raise MalformedFrameError(
                    f"column {name}.{cname} ({dtype}) carries {type(payload).__name__}; expected little-endian bytes"
                )
            itemsize = NUMPY_DTYPES[dtype].itemsize
            if len(payload) % itemsize:
                raise MalformedFrameError(
                    f"column {name}.{cname} ({dtype}) has {len(payload)} bytes, not a multiple of {itemsize}"
                )
            if len(payload) // itemsize != n:
                raise MalformedFrameError(
                    f"column {name}.{cname} ({dtype}) has {len(payload) // itemsize} values; expected n = {n}"
                )
    return n


def decode_columns(wire: Any, name: str = "") -> tuple[TableSchema, dict[str, Any]]:
    """Decode one wire table into its schema (from the wire) and ``{name: ndarray | list[str]}``.

    Numeric arrays are read-only views over the received bytes (copy them to modify).
    ``name`` names the table in the returned schema and in error messages.
    """
    check_wire_table(name, wire)
    schema_cols: list[Column] = []
    out: dict[str, Any] = {}
    for cname, (dtype, payload) in wire["cols"].items():
        schema_cols.append(Column(cname, dtype))
        out[cname] = payload if dtype == STR else np.frombuffer(payload, dtype=NUMPY_DTYPES[dtype])
    return TableSchema(name, tuple(schema_cols)), out


def decode_tables(tables: Any) -> dict[str, tuple[TableSchema, dict[str, Any]]]:
    """Decode every table of a batch's ``"tables"`` map."""
    if not isinstance(tables, dict):
        raise MalformedFrameError(f"batch 'tables' is a {type(tables).__name__}; expected a map of table name -> table")
    out: dict[str, tuple[TableSchema, dict[str, Any]]] = {}
    for tname, wire in tables.items():
        if not isinstance(tname, str) or not tname:
            raise MalformedFrameError(f"batch has a table named {tname!r:.40}; expected a non-empty str")
        out[tname] = decode_columns(wire, tname)
    return out
