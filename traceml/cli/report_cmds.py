"""``traceml report`` and ``traceml compare``: CI artifacts and the regression gate.

Both work from recordings (or summary.json files) alone; ``replay`` is imported inside the
command functions, so ``traceml --help`` stays light and no torch is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from traceml import escape as esc
from traceml.cli.settings import say
from traceml.errors import TracemlError

#: file and runtime errors; usage errors exit 2 (``traceml compare`` also exits 3 inconclusive,
#: 4 regression: docs/compare.md)
EXIT_ERROR = 1
EXIT_USAGE = 2


def _plotly_js_values(incomplete: str) -> list[str]:
    return [c for c in ("inline", "directory", "../plotly.min.js") if c.startswith(incomplete)]


def _fail(message: str, command: str = "report", code: int = EXIT_ERROR) -> typer.Exit:
    typer.echo(f"traceml {command}: error: {esc.visible(message, 2000)}", err=True)
    return typer.Exit(code)


def report(
    recording: Path = typer.Argument(..., help="the .tml recording to report on"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="output directory (default: <recording>_report next to the file)"
    ),
    last_n: int = typer.Option(
        100, "--last-n", min=1, help="size of the trailing window diagnosed next to the whole run"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace report files that exist in the output directory"
    ),
    log_to: list[str] | None = typer.Option(
        None,
        "--log-to",
        help="also log the summary, the verdict and the report files into wandb or mlflow (repeatable;"
        " docs/exports.md)",
    ),
    plotly_js: str = typer.Option(
        "inline",
        "--plotly-js",
        metavar="inline|directory|SRC.js",
        autocompletion=_plotly_js_values,
        help="inline: one self-contained report.html (default); directory: plotly.min.js beside it"
        " (report.html shrinks from ~4.9 MB to ~0.1 MB); a src ending in .js (e.g. ../plotly.min.js):"
        " report.html loads that file, which traceml does not write, so many reports share one copy",
    ),
    as_json: bool = typer.Option(False, "--json", help="print summary.json to stdout (nothing else)"),
) -> None:
    """Write report.html (self-contained), summary.json and summary.md from a recording.

    The summary.md is short Markdown fit for $GITHUB_STEP_SUMMARY.  Exit codes: 0 written,
    1 file error (a --log-to that fails is one too), 2 usage error.
    """
    from replay.report import check_plotly_js, write_report

    trackers = check_trackers(log_to, "report")
    try:
        check_plotly_js(plotly_js)
    except TracemlError as exc:
        raise _fail(str(exc), code=EXIT_USAGE) from exc
    target = out if out is not None else recording.with_name(recording.stem + "_report")
    try:
        files = write_report(
            recording,
            target,
            recent_steps=last_n,
            overwrite=overwrite,
            plotly_js=plotly_js,
        )
    except TracemlError as exc:
        raise _fail(str(exc)) from exc
    import json

    text = files.summary_json.read_text(encoding="utf-8")
    summary = json.loads(text)
    if as_json:
        typer.echo(text, nl=False)
    else:
        primary = summary["diagnosis"]["primary"]
        typer.echo(esc.visible(f"{primary['kind']} ({primary['severity']}): {primary['summary']}", 2000))
        for path in (files.html, files.summary_json, files.summary_md, files.plotly_js):
            if path is not None:
                say(f"wrote {path}")
    if trackers and not log_summary(trackers, summary, [files.html, files.summary_json, files.summary_md]):
        raise typer.Exit(EXIT_ERROR)


def check_trackers(log_to: list[str] | None, command: str) -> list[str]:
    """The --log-to values, checked before any work is done."""
    from traceml.exports.trackers import TRACKERS

    out: list[str] = []
    for value in log_to or []:
        if value not in TRACKERS:
            raise _fail(
                f"--log-to {value!r}: expected one of {', '.join(TRACKERS)} (give it once per tool)",
                command,
                EXIT_USAGE,
            )
        if value not in out:
            out.append(value)
    return out


def log_summary(trackers: list[str], summary: dict[str, Any], files: list[Path], run_name: str = "") -> bool:
    """Log into each tracker; print what was logged or why not.  False if any failed."""
    from traceml.exports.trackers import log_to

    ok = True
    for tracker in trackers:
        try:
            logged = log_to(tracker, summary, files, run_name=run_name)
        except TracemlError as exc:
            typer.echo(f"traceml: error: --log-to {tracker}: {esc.visible(str(exc), 2000)}", err=True)
            ok = False
            continue
        typer.echo(
            f"traceml: logged {logged.metrics} metrics and {len(logged.artifacts)} files into {tracker} run {logged.run}"
            + (f" ({esc.visible(logged.where, 500)})" if logged.where else "")
        )
    return ok


def compare(
    base_pos: Path | None = typer.Argument(None, metavar="[BASE]", help="baseline: a .tml recording or a summary.json"),
    new_pos: Path | None = typer.Argument(None, metavar="[NEW]", help="candidate: a .tml recording or a summary.json"),
    base: list[Path] = typer.Option(
        [], "--base", help="a baseline run; repeat for several runs of the baseline (instead of BASE)"
    ),
    new: list[Path] = typer.Option([], "--new", help="a candidate run; repeat for several runs (instead of NEW)"),
    max_regression: float = typer.Option(
        5.0, "--max-regression", help="gate in percent: a metric worse by more than this (confidently) is a regression"
    ),
    noise_floor: float | None = typer.Option(
        None,
        "--noise-floor",
        help="run-to-run drift in percent a timing regression must clear (default: 10 with one run per side, "
        "measured from the runs when a side has several); see docs/compare.md",
    ),
    aa: list[Path] = typer.Option(
        [],
        "--aa",
        help="an A/A partner of the (first) baseline: the same code run again; the noise floor is measured from "
        "their difference (repeatable: the largest counts)",
    ),
    paired: bool = typer.Option(
        False,
        "--paired",
        help="the i-th --base and i-th --new ran back to back (interleaved): resample them as pairs, so drift "
        "that both saw (a busy host) cancels",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="also write compare.html, compare.json, compare.md here"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap (results are deterministic for a seed)"),
    resamples: int = typer.Option(2000, "--resamples", min=100, max=100_000, help="bootstrap resamples"),
    overwrite: bool = typer.Option(False, "--overwrite", help="with --out: replace compare files that exist"),
    as_json: bool = typer.Option(False, "--json", help="print compare.json to stdout instead of the text table"),
) -> None:
    """Compare runs: a verdict per metric (step time, throughput, time outside steps, each phase, peak memory).

    BASE NEW compares one run with another; --base/--new (repeatable) take several runs per side,
    so that run-to-run drift is in the interval (a hierarchical bootstrap: runs, then blocks of
    steps).  With one run per side a timing regression must also clear a noise floor
    (--noise-floor, or --aa to measure it).  Verdicts: REGRESSION, IMPROVEMENT, EQUIVALENT,
    INCONCLUSIVE, with a 95% interval (warm-up excluded); with a summary.json input the interval
    is approximate (lower confidence).  Gated: step time, throughput, time outside steps, peak memory.

    Exit codes: 0 pass (equivalent or improved), 1 file error, 2 usage error, 3 inconclusive,
    4 regression.
    """
    if not max_regression > 0:
        raise _fail(
            f"--max-regression must be a positive percentage, e.g. 5; found {max_regression}", "compare", EXIT_USAGE
        )
    if noise_floor is not None and not noise_floor >= 0:
        raise _fail(f"--noise-floor must be a percentage >= 0, e.g. 8; found {noise_floor}", "compare", EXIT_USAGE)
    if noise_floor is not None and aa:
        raise _fail(
            "give either --noise-floor PCT or --aa FILE (the floor measured from an A/A pair), not both",
            "compare",
            EXIT_USAGE,
        )
    if (base_pos is None) != (new_pos is None):
        raise _fail(
            "give BASE and NEW both (or use --base FILE and --new FILE); found only one positional file",
            "compare",
            EXIT_USAGE,
        )
    bases = ([base_pos] if base_pos is not None else []) + list(base)
    news = ([new_pos] if new_pos is not None else []) + list(new)
    if not bases or not news:
        raise _fail(
            "expected a baseline and a candidate: `traceml compare BASE NEW`, or --base FILE and --new FILE "
            f"(repeatable); found {len(bases)} baseline and {len(news)} candidate file(s)",
            "compare",
            EXIT_USAGE,
        )
    if paired and len(bases) != len(news):
        raise _fail(
            f"--paired needs as many candidate runs as baseline runs (the i-th of each ran back to back); "
            f"found {len(bases)} baseline and {len(news)} candidate file(s)",
            "compare",
            EXIT_USAGE,
        )
    from replay.compare import compare_files
    from replay.compare_render import render_text, write_outputs

    try:
        result = compare_files(
            bases, news, max_regression_pct=max_regression, noise_floor_pct=noise_floor, aa=aa,
            resamples=resamples, seed=seed, paired=paired,
        )  # fmt: skip
        written = write_outputs(result, out, overwrite=overwrite) if out is not None else []
    except TracemlError as exc:
        raise _fail(str(exc), "compare") from exc
    if as_json:
        import json

        typer.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        typer.echo(render_text(result), nl=False)
        for path in written:
            say(f"wrote {path}")
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    """Add ``report`` and ``compare`` to *app*."""
    app.command("report")(report)
    app.command("compare")(compare)
