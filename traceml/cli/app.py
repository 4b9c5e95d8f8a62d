"""Typer application: each command group lives in its own module with a ``register(app)``."""

from __future__ import annotations

import typer

from traceml.cli import format_cmds, replay_cmds, report_cmds, run_cmd

app = typer.Typer(
    name="traceml",
    help="Record-and-replay profiler for PyTorch training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Record-and-replay profiler for PyTorch training."""


run_cmd.register(app)
format_cmds.register(app)
replay_cmds.register(app)
report_cmds.register(app)


@app.command("version")
def version() -> None:
    """Print traceml's version."""
    from traceml._version import __version__

    typer.echo(__version__)
