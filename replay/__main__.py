"""``python -m replay RUN.tml [options]``: the same as ``traceml replay`` (see ``--help``)."""

from __future__ import annotations

import sys

from traceml.cli import app


def main() -> None:
    app(args=["replay", *sys.argv[1:]], prog_name="python -m replay")


if __name__ == "__main__":
    main()
