"""The ``traceml`` command line: composes every room; heavy imports stay inside commands."""

from __future__ import annotations

from traceml.cli.app import app


def main() -> None:
    app(prog_name="traceml")


__all__ = ["app", "main"]
