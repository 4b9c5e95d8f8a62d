"""``traceml run``: the typer command.  Reads the options (torchrun's pass through), makes the
plan (:mod:`traceml.cli.launch_plan`), runs it (:mod:`traceml.cli.supervisor`) and exits with the
training's own exit code; ``--json`` / ``--log-to`` act on the recording afterwards.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from traceml.cli.launch_plan import UI_CHOICES, RunPlan, plan_run, shadowing_folders
from traceml.cli.run_args import TORCHRUN_ARG, option_table
from traceml.cli.supervisor import run_plan
from traceml.errors import ConfigError, OutputError, TracemlError

RunUi = enum.Enum("RunUi", {c: c for c in UI_CHOICES}, type=str)  # type: ignore[misc]
#: exit status of a usage error (every traceml command)
EXIT_USAGE = 2
#: the aggregator's port on node 0 of a multi-node Slurm job, unless --aggregator-port says otherwise
SLURM_AGGREGATOR_PORT = 29501


# --- the typer command -------------------------------------------------------------------------


class RunCommand(TyperCommand):
    """Reads the command line as torchrun would (see :mod:`traceml.cli.run_args`) before click
    does: torchrun's own options pass through, an unknown one is an error that names it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        from traceml.cli.run_args import rewrite

        known = option_table(self.params)
        for name in ctx.help_option_names:
            known[name] = False
        try:
            rewritten = rewrite(args, known)
        except ConfigError as exc:
            typer.echo(f"traceml run: error: {exc}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        for note in rewritten.notes:
            typer.echo(f"traceml run: {note}", err=True)
        return list(super().parse_args(ctx, rewritten.args))


def run_command(
    script: str = typer.Argument(..., help="the training script (or a module name with -m)"),
    script_args: list[str] | None = typer.Argument(None, help="arguments for the script, passed through untouched"),
    module: bool = typer.Option(False, "-m", "--module", help="SCRIPT is a module name, run as `python -m SCRIPT`"),
    nproc_per_node: str = typer.Option("1", "--nproc-per-node", help="ranks on this node: a number, auto, gpu or cpu"),
    nnodes: str | None = typer.Option(
        None, "--nnodes", help="nodes in the job, or MIN:MAX (elastic); default 1, or SLURM_NNODES under Slurm"
    ),
    node_rank: int | None = typer.Option(
        None, "--node-rank", help="this node's rank (node 0 runs the aggregator); Slurm: SLURM_NODEID"
    ),
    master_addr: str | None = typer.Option(
        None,
        "--master-addr",
        help="torchrun rendezvous address (default 127.0.0.1; Slurm: the job's first node)",
    ),
    master_port: int | None = typer.Option(None, "--master-port", help="default: a free port (29500 multi-node)"),
    ui: RunUi | None = typer.Option(None, "--ui", help="the live view (default: terminal on a TTY, else none)"),
    out: str | None = typer.Option(
        None, "--out", "-o", help="recording path (default traceml_runs/<run-name>/run.tml)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the --out recording if it exists"),
    run_name: str | None = typer.Option(None, "--run-name", help="default: <script>-<date>-<time>"),
    interval: float | None = typer.Option(
        None, "--interval", envvar="TRACEML_INTERVAL", help="seconds between samples (default 1.0)"
    ),
    aggregator_host: str | None = typer.Option(
        None, "--aggregator-host", help="aggregator address (node 0; default 127.0.0.1, Slurm multi-node: node 0)"
    ),
    aggregator_port: int | None = typer.Option(
        None, "--aggregator-port", help=f"default: a free port (Slurm multi-node: {SLURM_AGGREGATOR_PORT})"
    ),
    no_record: bool = typer.Option(False, "--no-record", help="live view only, no .tml file"),
    disable: bool = typer.Option(
        False, "--disable", envvar="TRACEML_DISABLED", help="run the script under torchrun with traceml off"
    ),
    as_json: bool = typer.Option(
        False, "--json", help="after the run, print its summary (summary.json's content) to stdout as one JSON line"
    ),
    web_port: int = typer.Option(8050, "--web-port", help="port of the live dashboard (--ui web)"),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="TRACEML_TOKEN",
        help="shared secret for multi-node runs (default: random; TRACEML_TOKEN keeps it off the command line)",
    ),
    no_auto_integrations: bool = typer.Option(
        False,
        "--no-auto-integrations",
        envvar="TRACEML_NO_AUTO_INTEGRATIONS",
        help="do not attach traceml to Hugging Face / Lightning Trainers",
    ),
    no_auto_steps: bool = typer.Option(
        False,
        "--no-auto-steps",
        envvar="TRACEML_NO_AUTO_STEPS",
        help="do not cut a script without trace_step into steps at optimizer.step()",
    ),
    log_to: list[str] | None = typer.Option(
        None,
        "--log-to",
        help="after the run, log the summary, the verdict and the report files into wandb or mlflow"
        " (repeatable; docs/exports.md)",
    ),
    otlp: str | None = typer.Option(
        None,
        "--otlp",
        help="the aggregator sends the run's metrics to this OTLP/HTTP endpoint while it runs and at its end"
        " (e.g. http://localhost:4318; OTEL_EXPORTER_OTLP_* variables apply)",
    ),
    otlp_interval: float = typer.Option(15.0, "--otlp-interval", min=0.1, help="seconds between --otlp pushes"),
    torchrun_arg: list[str] | None = typer.Option(None, TORCHRUN_ARG, hidden=True),
) -> None:
    """Run SCRIPT on torchrun with the live view, recording every step of every rank.

    torchrun's own options (--standalone, --rdzv-backend/-endpoint/-id/-conf, --max-restarts,
    --monitor-interval, --start-method, --log-dir, --redirects, --tee, ...) go before SCRIPT and
    are passed to torchrun as given; underscores (--nproc_per_node=2) work as in torchrun.
    Under Slurm (SLURM_NODEID set) --nnodes, --node-rank and --master-addr default to the job's.
    """
    from traceml.cli.report_cmds import check_trackers
    from traceml.cli.run_args import parse_nnodes, resolve_nproc, slurm_defaults

    trackers = check_trackers(log_to, "run")
    try:
        if otlp is not None:
            from traceml.exports.otlp import metrics_endpoint

            metrics_endpoint(otlp)
        nproc = resolve_nproc(nproc_per_node)
        slurm = slurm_defaults(os.environ) if None in (nnodes, node_rank, master_addr) else None
        if slurm is not None:
            for note in slurm.notes:
                typer.echo(f"traceml run: {note}", err=True)
        low, high = parse_nnodes(nnodes if nnodes is not None else str(slurm.nnodes if slurm else 1))
        node = node_rank if node_rank is not None else (slurm.node_rank if slurm else 0)
        master = master_addr or (slurm.master_addr if slurm else "127.0.0.1")
        agg_host = aggregator_host or ("127.0.0.1" if not slurm or low == 1 else ("0.0.0.0" if node == 0 else master))
        agg_port = aggregator_port
        if agg_port is None and slurm is not None and low > 1:
            agg_port = SLURM_AGGREGATOR_PORT
        plan = plan_run(
            script,
            script_args or [],
            nproc_per_node=nproc,
            nnodes=low,
            node_rank=node,
            master_addr=master,
            master_port=master_port,
            ui=str(ui.value) if ui is not None else None,
            out=out,
            run_name=run_name,
            interval=interval,
            aggregator_host=agg_host,
            aggregator_port=agg_port,
            no_record=no_record or disable,
            web_port=web_port,
            token=token,
            auto_integrations=not no_auto_integrations,
            auto_steps=not no_auto_steps,
            stdout_is_tty=sys.stdout.isatty(),
            overwrite=overwrite,
            module=module,
            max_nnodes=high,
        )
    except (ConfigError, OutputError) as exc:
        typer.echo(f"traceml run: error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    plan.module = module
    plan.otlp = otlp
    plan.otlp_interval_s = otlp_interval
    plan.torchrun_args = list(torchrun_arg or [])
    plan.nnodes_spec = nnodes if nnodes is not None and ":" in nnodes else ""
    plan.disabled = disable
    plan.shadowing = shadowing_folders(script, module)
    for path in plan.shadowing:
        typer.echo(
            f"traceml run: note: {path} is named like the traceml package and would be imported instead of it"
            " in the ranks; traceml keeps the working folder off their import path (PYTHONSAFEPATH=1)."
            " Rename it, or start from another folder, if the script imports from it.",
            err=True,
        )
    if (trackers or otlp is not None) and (plan.out is None or not plan.starts_aggregator):
        typer.echo(
            "traceml run: error: --log-to / --otlp export the recording: not with --no-record, --disable,"
            " or on a node other than node 0",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    if as_json and plan.out is None:
        typer.echo(
            "traceml run: error: --json prints the recording's summary: not with --no-record or --disable", err=True
        )
        raise typer.Exit(EXIT_USAGE)
    code = run_plan(plan)
    if trackers:
        export_after_run(plan, trackers, None)  # --otlp: the aggregator sent the metrics
    if as_json and plan.out is not None and plan.starts_aggregator:
        print_summary_json(plan.out)
    raise typer.Exit(code)


def print_summary_json(recording: Path) -> None:
    """``run --json``: the run's summary as one line on stdout (the last line the command prints)."""
    import json

    from traceml._summary import load_nested

    try:
        summary = load_nested(recording)
    except TracemlError as exc:
        typer.echo(f"traceml run: error: no summary to print: {exc}", err=True)
        return
    typer.echo(json.dumps(summary, allow_nan=False, separators=(",", ":")))


def export_after_run(plan: RunPlan, trackers: list[str], otlp: str | None) -> bool:
    """``--log-to`` / ``--otlp``: from this process, once the aggregator closed the recording.
    A failure is reported, never turned into the training's exit code.  False if any failed."""
    from traceml._summary import load_nested
    from traceml.cli.report_cmds import log_summary

    assert plan.out is not None
    try:
        summary = load_nested(plan.out)
    except TracemlError as exc:
        typer.echo(f"traceml run: cannot export the run: {exc}", err=True)
        return False
    ok = True
    if otlp is not None:
        from traceml.exports.otlp import send_summary

        try:
            sent = send_summary(summary, endpoint=otlp)
            typer.echo(f"traceml: sent {sent.points} OTLP data points to {sent.endpoint}")
        except TracemlError as exc:
            typer.echo(f"traceml run: --otlp: {exc}", err=True)
            ok = False
    if trackers:
        files: list[Path] = []
        try:
            from replay.report import write_report

            written = write_report(plan.out, plan.run_dir / "report", overwrite=True)
            files = [written.html, written.summary_json, written.summary_md]
        except TracemlError as exc:
            typer.echo(f"traceml run: no report files to log ({exc}); logging the summary only", err=True)
        ok = log_summary(trackers, summary, files, run_name=plan.run_name) and ok
    return ok


def register(app: typer.Typer) -> None:
    """Add ``traceml run`` to *app*."""
    app.command(
        "run",
        cls=RunCommand,
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )(run_command)
