"""Typer application: each command group lives in its own module with a ``register(app)``.

Conventions shared by every command: docs/cli.md (usage errors exit 2, file and runtime errors 1).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import typer

from traceml._summary import DEFAULT_RUNS_DIR
from traceml.cli import format_cmds, report_cmds, run_cmd
from traceml.cli.settings import QUIET_ENV, load_config

COLOR_CHOICES = ("auto", "always", "never")

app = typer.Typer(
    name="traceml",
    help="Record-and-replay profiler for PyTorch training.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from traceml._version import __version__

        typer.echo(f"traceml {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", "-V", is_eager=True, callback=_print_version, help="print the version and exit"
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="no progress lines (wrote ..., traceml: run ...); only errors in the log"
    ),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="more log detail (-vv: debug)"),
    color: str = typer.Option(
        "auto",
        "--color",
        envvar="TRACEML_COLOR",
        help="auto | always | never (auto honours NO_COLOR and FORCE_COLOR)",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        envvar="TRACEML_CONFIG",
        help="defaults for the commands' options (default: ./traceml.toml, else the tool.traceml table of ./pyproject.toml)",
    ),
) -> None:
    """Record-and-replay profiler for PyTorch training."""
    if color not in COLOR_CHOICES:
        typer.echo(f"traceml: error: --color {color!r}: expected one of {', '.join(COLOR_CHOICES)}", err=True)
        raise typer.Exit(2)
    if color == "never":
        os.environ["NO_COLOR"] = "1"
        os.environ.pop("FORCE_COLOR", None)
    elif color == "always":
        os.environ["FORCE_COLOR"] = "1"
        os.environ.pop("NO_COLOR", None)
    if quiet:
        os.environ[QUIET_ENV] = "1"
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="traceml: %(levelname)s: %(name)s: %(message)s")
    logging.getLogger("traceml").setLevel(level)
    try:
        defaults = load_config(config, ctx.command)
    except Exception as exc:  # ConfigError: the file named, the key, what to change
        typer.echo(f"traceml: error: {exc}", err=True)
        raise typer.Exit(2) from None
    if defaults:
        ctx.default_map = defaults


def _register_replay(group: typer.Typer) -> None:
    # the one import of replay from traceml's CLI: replay.cli holds only typer and the option
    # table; the engine, player and dashboard load inside the command when it runs
    from replay.cli import register

    register(group)


run_cmd.register(app)
format_cmds.register(app)
_register_replay(app)
report_cmds.register(app)


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_info() -> dict[str, Any]:
    """What a bug report needs: versions of traceml, Python, torch, CUDA/NCCL, the platform.

    torch is not imported (its version comes from the installed metadata); the CUDA driver
    comes from NVML when there is one."""
    from traceml._version import __version__

    info: dict[str, Any] = {
        "traceml": __version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": _dist_version("torch"),
        "nccl": next((v for v in (_dist_version("nvidia-nccl-cu12"), _dist_version("nvidia-nccl-cu11")) if v), None),
        "cuda_driver": None,
        "gpus": 0,
        "packages": {
            name: _dist_version(name) for name in ("numpy", "msgpack", "zstandard", "rich", "plotly", "dash", "typer")
        },
    }
    torch_version = info["torch"] or ""
    info["torch_cuda"] = torch_version.split("+", 1)[1] if "+" in torch_version else None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["cuda_driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
            info["gpus"] = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    return info


@app.command("version")
def version(
    as_json: bool = typer.Option(
        False, "--json", help="print versions of traceml, Python, torch, CUDA, NCCL and the platform as JSON"
    ),
) -> None:
    """Print traceml's version (--json: everything a bug report needs)."""
    if as_json:
        typer.echo(json.dumps(version_info(), indent=2))
        return
    from traceml._version import __version__

    typer.echo(__version__)


@app.command("runs")
def runs(
    runs_dir: Path = typer.Argument(Path(DEFAULT_RUNS_DIR), help=f"the runs folder (default ./{DEFAULT_RUNS_DIR})"),
    as_json: bool = typer.Option(False, "--json", help="print the listing as JSON"),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="newest N runs"),
) -> None:
    """List the recorded runs: name, date, steps, verdict, size (newest first)."""
    from traceml.cli.runs_list import list_runs, render_runs

    try:
        rows = list_runs(runs_dir, limit=limit)
    except OSError as exc:
        typer.echo(f"traceml runs: error: cannot read {runs_dir}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    render_runs(rows, runs_dir)


def main() -> None:
    app(prog_name="traceml")


__all__ = ["app", "main", "version_info"]
