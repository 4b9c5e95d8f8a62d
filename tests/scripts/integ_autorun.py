"""Run ``SCRIPT ARGS...`` under ``traceml.integrations.executor`` from inside a rank.

For the integration tests while ``traceml run`` still launches ``traceml.runtime.executor``:
``traceml run tests/scripts/integ_autorun.py SCRIPT ARGS...`` then behaves as
``traceml run SCRIPT ARGS...`` will once it launches the integrations' executor (agent
started, Trainer import hooks installed, SCRIPT run as ``__main__``).
"""

from __future__ import annotations

import sys

from traceml.integrations.executor import main

if __name__ == "__main__":
    main(sys.argv[1:])
