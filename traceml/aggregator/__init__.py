"""The aggregator room: one process per run (``python -m traceml.aggregator``, started by ``traceml run``).

Receives, stores, spools to ``.tml`` and serves the UI drivers; never imports torch, dash only for ``--ui web``.
"""
