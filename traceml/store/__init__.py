"""Stores: bounded tables on the rank side, bounded column stores in the aggregator,
and the one read-only :class:`StoreView` that every view and renderer takes.

Imports only leaves (``traceml.schema``, ``traceml.errors``): never format or transport.
"""

from traceml.store.columns import ColumnStore
from traceml.store.rank_table import BoundedTable
from traceml.store.view import RankInfo, StoreView

__all__ = ["BoundedTable", "ColumnStore", "RankInfo", "StoreView"]
