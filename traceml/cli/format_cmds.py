"""``traceml inspect | recover | export``: look into, repair and convert ``.tml`` recordings.

Errors print one line and exit 1 (usage 2); ``recover`` and ``inspect --check`` exit 3 when data was lost.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from pathlib import Path
from typing import Any, NoReturn

import typer

from traceml import escape as esc
from traceml.cli.settings import say
from traceml.errors import TracemlError
from traceml.units import fmt_bytes

EXPORT_FORMATS = ("csv", "chrome-trace", "parquet", "prometheus", "otlp")
ExportFormat = enum.Enum("ExportFormat", {f.replace("-", "_"): f for f in EXPORT_FORMATS}, type=str)  # type: ignore[misc]
EXIT_FAILED = 1
EXIT_DATA_LOST = 3


def register(app: typer.Typer) -> None:
    """Add ``inspect``, ``recover`` and ``export`` to *app*."""
    app.command("inspect")(inspect_cmd)
    app.command("recover")(recover_cmd)
    app.command("export")(export_cmd)


def inspect_cmd(
    path: Path = typer.Argument(..., help="the .tml recording"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    check: bool = typer.Option(
        False, "--check", help="exit 3 when the file is damaged or was not closed cleanly (recovered), 0 when complete"
    ),
) -> None:
    """Show a recording's header, tables, segments, sizes and integrity (reads every record).

    Exit codes: 0 shown (with --check: the file is complete), 1 file error, 2 usage error,
    3 with --check: damaged or recovered.
    """
    from traceml.format import open_recording

    try:
        with open_recording(path) as reader:
            info = reader.inspect()
    except TracemlError as exc:
        _fail(exc, "inspect")
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=_json_default))
    else:
        _print_inspection(info)
    if check and info["integrity"]["status"] != "complete":
        raise typer.Exit(EXIT_DATA_LOST)


def recover_cmd(
    path: Path = typer.Argument(..., help="the crashed or damaged .tml recording"),
    output: Path = typer.Option(..., "-o", "--out", "--output", help="where to write the clean copy"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the output file if it exists"),
) -> None:
    """Rewrite a crashed or damaged recording as a clean one.  Exit 0: nothing lost; 3: data lost; 1: failed."""
    from traceml.format.recover import recover
    from traceml.outpaths import check_new_file

    try:
        check_new_file(output, overwrite=overwrite, option="-o")
        result = recover(path, output)
    except TracemlError as exc:
        _fail(exc, "recover")
    integrity = result.integrity
    typer.echo(
        f"wrote {output}: {result.rows} rows from {result.segments} segments, {result.attachments} attachments"
        f" (source: {esc.visible(integrity['message'])})"
    )
    if result.lost:
        for item in integrity["skipped"][:10]:
            typer.echo(f"  lost {item['length']} bytes at byte {item['offset']}: {esc.visible(item['reason'])}")
        raise typer.Exit(EXIT_DATA_LOST)


def export_cmd(
    path: Path = typer.Argument(..., help="the .tml recording"),
    fmt: ExportFormat = typer.Option(
        ...,
        "--format",
        help="csv (a directory, one file per table), chrome-trace (JSON), parquet (a directory of"
        " Hive-partitioned datasets, one per table; several runs may share it), prometheus (a"
        " textfile-collector .prom file) or otlp (send the run's metrics to an OpenTelemetry collector)",
    ),
    output: Path | None = typer.Option(
        None, "-o", "--out", "--output", help="output directory (csv, parquet) or file (chrome-trace, prometheus)"
    ),
    endpoint: str | None = typer.Option(
        None,
        "--endpoint",
        help="--format otlp: the collector's OTLP/HTTP base URL (default: the OTEL_EXPORTER_OTLP_* variables,"
        " else http://localhost:4318)",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace output files that exist"),
    steps: str | None = typer.Option(
        None, "--steps", help="chrome-trace: only steps A to B-1 (A:B; either side may be left out, e.g. 1000:2000)"
    ),
    gzip_trace: bool = typer.Option(
        True, "--gzip/--no-gzip", help="chrome-trace: gzip the JSON (default; Perfetto opens .json.gz as it is)"
    ),
) -> None:
    """Export a recording: CSV per table, a Chrome trace (Perfetto), Parquet (DuckDB, Spark, Polars),
    a Prometheus textfile, or OTLP metrics."""
    from traceml.format import open_recording
    from traceml.format.export import export_csv

    fmt = getattr(fmt, "value", fmt)  # the choice's name as typed
    if fmt in ("prometheus", "otlp"):
        _export_summary(path, fmt, output, endpoint, overwrite)
        return
    if output is None:
        _fail(f"--format {fmt} writes files: give -o/--output (a directory for csv, a file for chrome-trace)")
    try:
        with open_recording(path) as reader:
            if fmt == "csv":
                files = export_csv(reader, output, overwrite=overwrite)
                say(f"wrote {len(files)} CSV files to {output}: {', '.join(_csv_name(t, f) for t, f in files)}")
            elif fmt == "parquet":
                from traceml.format.parquet import export_parquet

                _print_parquet(export_parquet(reader, output, overwrite=overwrite))
            else:
                _export_chrome_trace(reader, output, overwrite, steps, gzip_trace)
            integrity = reader.integrity
    except TracemlError as exc:
        _fail(exc)
    if integrity["status"] != "complete":
        typer.echo(f"note: {esc.visible(integrity['message'])}", err=True)


def _export_chrome_trace(reader: Any, output: Path, overwrite: bool, steps: str | None, gzip_trace: bool) -> None:
    from traceml.format.export import CHROME_TRACE_WARN_BYTES, parse_steps, write_chrome_trace

    window = parse_steps(steps)
    if gzip_trace and output.suffix != ".gz":
        output = output.with_name(output.name + ".gz")  # say what it is: trace.json -> trace.json.gz
    written = write_chrome_trace(reader, output, overwrite=overwrite, gzip_output=gzip_trace, steps=window)
    size = written.stat().st_size
    say(f"wrote {written} ({size / 2**20:.1f} MiB; open it in https://ui.perfetto.dev)")
    if size > CHROME_TRACE_WARN_BYTES:
        typer.echo(
            f"warning: {written} is {size / 2**20:.0f} MiB, more than Perfetto in a browser opens comfortably "
            f"({CHROME_TRACE_WARN_BYTES // 2**20} MiB); export a window of steps with --steps A:B",
            err=True,
        )


def _csv_name(table: str, path: Path) -> str:
    """The file's name, and the table's (escaped) when the name had to change to be a safe file name."""
    if path.name == f"{table}.csv":
        return path.name
    return f"{path.name} (table '{esc.visible(table)}')"


def _print_parquet(result: Any) -> None:
    where = f"{result.out_dir}/<table>/{result.partition + '/' if result.partition else ''}rank=<r>/"
    tables = ", ".join(f"{name} {rows:,}" for name, rows in sorted(result.rows.items())) or "none"
    say(f"wrote {result.total_rows:,} rows in {len(result.files)} Parquet files to {where} ({tables})")
    for run in result.moved_runs:
        typer.echo(f"moved the earlier export of run {run!r} under run=<id> partitions (several runs now share it)")
    for name, reason in result.skipped.items():
        typer.echo(f"skipped table {name}: {reason}", err=True)


def _export_summary(path: Path, fmt: str, output: Path | None, endpoint: str | None, overwrite: bool) -> None:
    """``export --format prometheus|otlp``: the run's summary metrics, recomputed from the rows."""
    from traceml._summary import load_nested

    if fmt == "prometheus" and output is None:
        _fail("--format prometheus writes a file: give -o/--output, e.g. -o /var/lib/node_exporter/textfile/run.prom")
    try:
        summary = load_nested(path)
        if fmt == "prometheus":
            from traceml.exports.prometheus import render_textfile, write_textfile

            assert output is not None
            write_textfile(render_textfile(summary), output, overwrite=overwrite)
            say(f"wrote {output} (Prometheus text format; see docs/exports.md for the textfile collector)")
        else:
            from traceml.exports.otlp import send_summary

            sent = send_summary(summary, endpoint=endpoint)
            typer.echo(f"sent {sent.points} data points in {sent.resources} resources to {sent.endpoint}")
    except TracemlError as exc:
        _fail(exc)
    integrity = summary.get("integrity", {})
    if integrity.get("status") not in ("complete", None):
        typer.echo(f"note: {esc.visible(integrity.get('message', ''))}", err=True)


def _fail(error: object, command: str = "export") -> NoReturn:
    typer.echo(f"traceml {command}: error: {esc.visible(error, max_chars=2000)}", err=True)
    raise typer.Exit(EXIT_FAILED)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _when(ns: int | None) -> str:
    if ns is None or ns <= 0:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _span(lo: int | None, hi: int | None) -> str:
    if lo is None or hi is None:
        return "-"
    return f"{_when(lo)} .. {_when(hi)} ({(hi - lo) / 1e9:,.1f} s)"


def _bytes(n: float) -> str:
    return fmt_bytes(n, grouped=True, largest="GiB")


def _list(value: Any) -> list[Any]:
    """A header field that should be a list (a crafted file may hold anything)."""
    return list(value) if isinstance(value, list | tuple) else [] if value is None else [value]


def _print_inspection(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, emoji=False)  # names from the file are shown as typed
    header = info["header"]
    console.print(f"[bold]{esc.rich(info['path'], None)}[/bold]  ({_bytes(info['file_bytes'])})")
    console.print(
        f"run {esc.rich(header.get('run_id', ''))}  format {esc.rich(header.get('format_version', ''))}"
        f"  written by {esc.rich(header.get('writer', ''))}"
    )
    console.print(
        f"created {_when(header.get('created_ns'))}  hosts {esc.rich(', '.join(map(str, _list(header.get('hosts')))))}"
        f"  world size {esc.rich(header.get('world_size', -1))}"
    )
    console.print(f"command: {esc.rich(' '.join(map(str, _list(header.get('command')))), 1000)}")
    console.print(f"ranks: {esc.rich(', '.join(map(str, info['ranks'])), 1000) or '-'}")

    tables = Table(title="tables", title_justify="left")
    for name, justify in (
        ("table", "left"),
        ("ranks", "right"),
        ("rows", "right"),
        ("steps", "right"),
        ("time", "left"),
    ):
        tables.add_column(name, justify=justify)  # type: ignore[arg-type]
    for name, entry in info["tables"].items():
        steps = "-" if entry["step_min"] is None else f"{entry['step_min']}..{entry['step_max']}"
        tables.add_row(
            esc.rich(name), str(len(entry["ranks"])), f"{entry['rows']:,}", steps, _span(entry["t_min"], entry["t_max"])
        )
    console.print(tables)

    seg = info["segments"]
    ratio = "-" if seg["compression_ratio"] is None else f"{seg['compression_ratio']:.2f}x"
    per_row = "-" if seg["bytes_per_row"] is None else f"{seg['bytes_per_row']:.1f} B"
    console.print(
        f"segments: {seg['count']:,}  rows: {seg['rows']:,}  column bytes: {_bytes(seg['raw_bytes'])}"
        f"  stored: {_bytes(seg['stored_bytes'])}  compression: {ratio}  per row on disk: {per_row}"
    )
    rollups = info.get("rollups") or {}
    if rollups.get("tables"):
        rows = ", ".join(f"{esc.rich(name)} {entry['rows']:,} rows" for name, entry in rollups["tables"].items())
        console.print(f"rollups (every {rollups['steps']} steps): {rows}")
    console.print(f"attachments: {', '.join(esc.rich(name) for name in info['attachments']) or '-'}")

    integrity = info["integrity"]
    colour = {"complete": "green", "recovered": "yellow", "damaged": "red"}[integrity["status"]]
    console.print(f"integrity: [bold {colour}]{esc.rich(integrity['message'], 1000)}[/]")
    for item in integrity["skipped"][:20]:
        console.print(
            f"  skipped {item['length']:,} bytes at byte {item['offset']:,}: {esc.rich(item['reason'], 1000)}"
        )
    if len(integrity["skipped"]) > 20:
        console.print(f"  ... and {len(integrity['skipped']) - 20} more")
