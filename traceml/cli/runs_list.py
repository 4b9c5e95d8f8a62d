"""``traceml runs``: the recordings under ``traceml_runs/`` with name, date, steps, verdict and size.

Reads only each file's header, index and attachments (the ``summary`` a cleanly closed run
embeds); a file that cannot be opened is listed with the reason.  Names are escaped for the terminal.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from traceml import escape as esc
from traceml.units import fmt_bytes


def _run_row(path: Path) -> dict[str, Any]:
    from traceml.format import open_recording

    st = path.stat()
    row: dict[str, Any] = {
        "name": path.parent.name,
        "path": str(path),
        "date": dt.datetime.fromtimestamp(st.st_mtime, tz=dt.timezone.utc).isoformat(timespec="seconds"),
        "bytes": st.st_size,
        "steps": None,
        "verdict": None,
        "severity": None,
        "status": None,
    }
    try:
        with open_recording(path) as reader:
            row["status"] = reader.integrity["status"]
            summary = reader.attachments.get("summary")
            if isinstance(summary, dict):
                steps = summary.get("steps", {})
                row["steps"] = steps.get("count") if isinstance(steps, dict) else None
                primary = summary.get("diagnosis", {}).get("primary", {})
                if isinstance(primary, dict):
                    row["verdict"] = primary.get("kind")
                    row["severity"] = primary.get("severity")
            if row["steps"] is None:
                rows = sum(n for seg in reader.segments for (_, t), n in seg.rows.items() if t == "step_time")
                row["steps"] = rows or None
    except Exception as exc:  # a damaged or foreign file is listed, not fatal
        row["status"] = f"unreadable: {exc}"
    return row


def list_runs(runs_dir: Path, *, limit: int = 50) -> list[dict[str, Any]]:
    if not runs_dir.is_dir():
        return []
    files = sorted(runs_dir.glob("*/*.tml"), key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
    return [_run_row(p) for p in files]


def render_runs(rows: list[dict[str, Any]], runs_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not rows:
        console.print(f"no recordings under {esc.rich(str(runs_dir))} (traceml run writes <run>/run.tml there)")
        return
    table = Table(title=f"runs in {esc.rich(str(runs_dir))}", title_justify="left")
    for name, justify in (("name", "left"), ("date", "left"), ("steps", "right"), ("verdict", "left"),
                          ("size", "right"), ("file", "left")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        verdict = r["verdict"] or "-"
        if r["severity"]:
            verdict = f"{verdict} ({r['severity']})"
        if r["status"] and r["status"] != "complete":
            verdict = f"{verdict} [{r['status']}]"
        table.add_row(
            esc.rich(r["name"]),
            r["date"].replace("T", " ")[:19],
            "-" if r["steps"] is None else f"{r['steps']:,}",
            esc.rich(str(verdict)),
            fmt_bytes(r["bytes"], grouped=True, largest="GiB"),
            esc.rich(Path(r["path"]).name),
        )
    console.print(table)
