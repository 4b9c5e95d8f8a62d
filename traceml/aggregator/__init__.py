"""The aggregator room: one process per run (``python -m traceml.aggregator``, started by
``traceml run``).

TelemetryServer -> :class:`~traceml.aggregator.ingest.Ingest` (decode, ``ColumnStore.append``,
enqueue to the spool) -> :class:`~traceml.aggregator.spool.Spool` thread -> ``TmlWriter``.  UI
drivers read ``ColumnStore.snapshot()`` on their own clock.  The CLI talks to it over the
control channel (:mod:`traceml.aggregator.control`).  Never imports torch; dash only for
``--ui web``.
"""
