"""The one registry of everything the rank runtime patches or hooks.

Each entry has a readable name and the function that undoes it, so ``traceml.shutdown()`` removes them all
and tests can prove none outlived them (:func:`active_patches`).  Imports nothing heavy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("traceml.runtime")

_lock = threading.Lock()
_active: dict[str, Callable[[], None]] = {}


def register(name: str, undo: Callable[[], None]) -> str:
    """Record an installed patch; ``undo`` must restore what was there before."""
    with _lock:
        if name in _active:
            raise ValueError(f"patch {name!r} is already registered; undo it before installing it again")
        _active[name] = undo
    return name


def is_active(name: str) -> bool:
    with _lock:
        return name in _active


def undo(name: str) -> bool:
    """Undo one patch; returns False when it was not installed.  Never raises."""
    with _lock:
        fn = _active.pop(name, None)
    if fn is None:
        return False
    try:
        fn()
    except Exception:
        logger.warning("traceml: could not undo patch %s; it stays inert", name, exc_info=True)
    return True


def undo_all() -> list[str]:
    """Undo every patch, newest first (so stacked patches unwind in order)."""
    with _lock:
        names = list(_active)
    for name in reversed(names):
        undo(name)
    return names


def active_patches() -> list[str]:
    """Names of the patches installed now, oldest first."""
    with _lock:
        return list(_active)


def patch_attribute(owner: Any, attr: str, replacement: Any, name: str) -> str:
    """Replace ``owner.attr`` by ``replacement`` and register the undo.

    The undo restores the original only while ``owner.attr`` is still our replacement;
    if someone patched over us since, restoring would drop their patch, so ours stays
    in place (it passes through once its agent is closed; logged at debug level).
    """
    own = vars(owner)
    had_own = attr in own
    original = own[attr] if had_own else getattr(owner, attr)

    def restore() -> None:
        if vars(owner).get(attr) is replacement:
            if had_own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # it was inherited: uncover the base's again
        else:
            # expected, e.g. torch.distributed wraps sys.excepthook after us: not worth a warning
            logger.debug(
                "traceml: %s.%s was patched again after traceml; leaving both in place (traceml's part is inert)",
                getattr(owner, "__name__", owner),
                attr,
            )

    setattr(owner, attr, replacement)
    return register(name, restore)
