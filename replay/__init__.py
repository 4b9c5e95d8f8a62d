"""replay: read traceml recordings back: the engine, the Dash post-mortem, reports, comparisons.

``replay.open(path)`` returns a :class:`~replay.engine.Recording`.  Importing replay imports neither
torch nor dash; the engine loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replay.engine import Recording, open

__all__ = ["Recording", "open"]

#: submodules reachable as ``replay.<name>`` after a bare ``import replay``, as before it was lazy
_SUBMODULES = frozenset(
    {
        "cli",
        "compare",
        "compare_input",
        "compare_model",
        "compare_render",
        "dashboard",
        "engine",
        "player",
        "report",
        "stats",
    }
)


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("replay.engine"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"replay.{name}")
    raise AttributeError(f"module 'replay' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
