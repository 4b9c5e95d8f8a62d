"""``traceml replay RUN.tml`` (and ``python -m replay``): play a recording in the terminal or serve the dashboard.

Heavy imports happen inside the command; exit codes: 0 done, 1 file or runtime error, 2 usage error.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path

import typer

from traceml.errors import ConfigError, TracemlError

EXIT_ERROR = 1
EXIT_USAGE = 2
UI_CHOICES = ("terminal", "web")
ReplayUi = enum.Enum("ReplayUi", {c: c for c in UI_CHOICES}, type=str)  # type: ignore[misc]


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.echo(f"traceml replay: error: {message}", err=True)
    return typer.Exit(code)


def replay(
    recording: Path = typer.Argument(..., help="the .tml recording (a crashed or growing one works too)"),
    ui: ReplayUi = typer.Option("terminal", "--ui", help="terminal (the live view) or web (the Dash dashboard)"),
    speed: str = typer.Option(
        "1", "--speed", help="1 = real time, 10 = ten times faster, max = print the end state once"
    ),
    start: str | None = typer.Option(
        None, "--from", help="start of the window: seconds since the run started (90, 12.5) or a step (step:500)"
    ),
    end: str | None = typer.Option(None, "--to", help="end of the window, like --from (inclusive)"),
    from_step: int | None = typer.Option(None, "--from-step", min=0, help="same as --from step:N"),
    to_step: int | None = typer.Option(None, "--to-step", min=0, help="same as --to step:N"),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="tail a recording still being written; stops at its footer or on Ctrl-C"
    ),
    compare: Path | None = typer.Option(None, "--compare", help="web: a second recording overlaid as B"),
    host: str = typer.Option("127.0.0.1", "--host", help="web: address to bind (the dashboard has no login)"),
    port: int = typer.Option(8050, "--port", "--web-port", min=0, max=65535, help="web: port (0 picks a free one)"),
    width: int | None = typer.Option(
        None, "--width", min=40, help="terminal: columns to draw (default: the terminal's)"
    ),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="show a progress bar while a large file loads"
    ),
) -> None:
    """Replay a recording: the live terminal view (default) or the web dashboard.

    Windows: --from/--to take seconds since the run started (e.g. --from 60 --to 120) or
    steps with a step: prefix (--from step:1000 --to step:2000, also --from-step/--to-step);
    only rows inside the window are replayed.  --speed max skips the playback and prints
    the end state once.
    """
    from rich.console import Console

    import replay as replay_pkg
    from replay.player import Bound, parse_bound, parse_speed, play
    from replay.player import follow as follow_recording

    ui = getattr(ui, "value", ui)
    try:
        if ui not in UI_CHOICES:
            raise ConfigError(f"--ui {ui!r}: expected one of {', '.join(UI_CHOICES)}")
        if from_step is not None and start is not None:
            raise ConfigError("give --from or --from-step, not both")
        if to_step is not None and end is not None:
            raise ConfigError("give --to or --to-step, not both")
        lo = (
            Bound("step", float(from_step))
            if from_step is not None
            else (parse_bound(start, "--from") if start else None)
        )
        hi = Bound("step", float(to_step)) if to_step is not None else (parse_bound(end, "--to") if end else None)
        rate = parse_speed(speed)
        if ui == "web":
            if lo is not None or hi is not None:
                raise ConfigError(
                    "--from/--to apply to --ui terminal; in the dashboard, drag across a step axis to zoom"
                )
            from replay.dashboard import serve

            try:
                serve(
                    recording,
                    compare=compare,
                    follow=follow,
                    host=host,
                    port=port,
                    progress=None if progress else False,
                )
            except ConfigError as exc:  # a busy port, a file: not a usage error
                raise _fail(str(exc)) from exc
            return
        if compare is not None:
            raise ConfigError("--compare needs --ui web (or use `traceml compare A.tml B.tml`)")
        console = Console(width=width) if width else Console()
        rec = replay_pkg.open(recording, follow=follow, progress=None if progress else False)
        try:
            if follow:
                if lo is not None or hi is not None:
                    raise ConfigError("--follow shows the run as it grows; --from/--to apply to finished recordings")
                follow_recording(rec, console=console)
            else:
                play(rec, speed=rate, start=lo, end=hi, console=console)
            integrity = rec.integrity
            if integrity["status"] != "complete":
                typer.echo(f"note: {integrity['message']}", err=True)
        finally:
            rec.close()
    except ConfigError as exc:  # an option's value: a usage error
        raise _fail(str(exc), EXIT_USAGE) from exc
    except TracemlError as exc:
        raise _fail(str(exc)) from exc
    except KeyboardInterrupt:
        sys.stderr.write("\n")


def register(app: typer.Typer) -> None:
    """Add ``traceml replay`` to *app*."""
    app.command("replay")(replay)


def main(argv: list[str] | None = None) -> None:
    """``python -m replay``: the replay command on its own, without the rest of the traceml CLI."""
    standalone = typer.Typer(
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    standalone.command()(replay)
    standalone(args=sys.argv[1:] if argv is None else argv, prog_name="python -m replay")
