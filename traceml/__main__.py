"""``python -m traceml``: the ``traceml`` command line."""

from traceml.cli import main

main()
