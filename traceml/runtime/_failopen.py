"""Fail-open helpers: telemetry code never lets an exception reach the user.

Each piece that fails is logged once (``logging.getLogger("traceml.runtime")``) and
then disables itself; the caller decides what "disable" means for it.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("traceml.runtime")

_seen: set[str] = set()
_lock = threading.Lock()


def log_once(key: str, message: str, *args: object, exc_info: bool = False, level: int = logging.WARNING) -> bool:
    """Log ``message`` the first time ``key`` is seen in this process; returns whether it logged."""
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.log(level, message, *args, exc_info=exc_info)
    return True


def disable_piece(key: str, what: str) -> None:
    """Log (once) that a telemetry piece failed and is now off, with the traceback."""
    log_once(
        key, "traceml: %s failed and is disabled for the rest of this run; training is unaffected", what, exc_info=True
    )
