"""replay: read traceml recordings back: the engine, the Dash post-mortem, reports, comparisons.

``replay.open(path)`` returns a :class:`~replay.engine.Recording`: run metadata, ranks, tables,
``columns(table, rank, steps=, time=)`` read through the file's index, ``view()`` (the same
StoreView the live aggregator fills) and ``integrity``.  Importing replay imports neither
torch nor dash.
"""

from __future__ import annotations

from replay.engine import Recording, open

__all__ = ["Recording", "open"]
