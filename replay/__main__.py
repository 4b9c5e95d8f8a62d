"""``python -m replay RUN.tml [options]``: the same as ``traceml replay`` (see ``--help``)."""

from __future__ import annotations

from replay.cli import main

if __name__ == "__main__":
    main()
