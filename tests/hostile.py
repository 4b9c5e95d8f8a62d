"""Recordings a colleague (or an attacker) might send: well-formed ``.tml`` files whose names and
metadata are hostile.  Shared by the security tests.

Files are written with the project's own ``TmlWriter``.  When the writer enforces the name
policy (``traceml.names``), :func:`policy_off` lifts it while the file is written: the file then
looks as one from another writer, an older version, or a hand-crafted one, which readers must
survive anyway.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from traceml.format import TmlWriter
from traceml.schema import STEP_TIME, rows_to_columns

#: names that try every trick: separators, traversal, absolute paths, devices, control
#: characters, terminal escapes (CSI, OSC 8 links, title), Rich markup, HTML, Markdown
HOSTILE_NAMES: tuple[str, ...] = (
    "../../x",
    "/tmp/x",
    "..",
    "a\\..\\..\\b",
    "CON",
    "nul.txt",
    "[/bold]",
    "[red]red[/red] [link=https://evil]x[/link]",
    "</title><script>document.title='pwned'</script>",
    "<img src=x onerror=alert(1)>",
    "\x1b[2J\x1b[31mred\x1b]0;title\x07\x1b]8;;https://evil\x1b\\link\x1b]8;;\x1b\\",
    "bell\x07 nul\x00 del\x7f c1\x9b",
    "line\nbreak\rreturn",
    "\u202eevil\u202c rtl",
    "*bold* _em_ `code` | pipe # [link](https://evil) ![img](x) @everyone",
    "x" * 400,
)


@contextlib.contextmanager
def policy_off() -> Iterator[None]:
    """Let the writer write any name (patches ``traceml.names`` checks where they exist)."""
    try:
        names = importlib.import_module("traceml.names")
    except ImportError:
        yield
        return
    with contextlib.ExitStack() as stack:
        for attr in dir(names):
            if attr.startswith("check_"):
                fn = getattr(names, attr)
                stack.enter_context(mock.patch.object(names, attr, lambda value, *a, _f=fn, **k: value))
            elif attr.endswith("_problem"):
                stack.enter_context(mock.patch.object(names, attr, lambda *a, **k: None))
        yield


def step_rows(n: int, rank: int = 0) -> dict[str, Any]:
    rows = []
    for step in range(n):
        phases = [300, 800, 30_000, 60_000, 5_000, 100 + rank * 10]
        row = {
            "step": step,
            "ts_ns": 1_760_000_000_000_000_000 + step * 100_000_000 + rank,
            "step_us": sum(phases),
            "failed": 0,
        }
        row.update(
            zip(
                ("dataloader_us", "h2d_us", "forward_us", "backward_us", "optimizer_us", "residual_us"),
                phases,
                strict=True,
            )
        )
        rows.append(tuple(row.get(c.name, -1) for c in STEP_TIME.columns))
    return rows_to_columns(STEP_TIME, rows)


def write_hostile(
    path: Path,
    *,
    run_id: str = "hostile",
    run_name: str = "hostile",
    host: str = "node",
    command: Sequence[str] = ("train.py",),
    tables: Sequence[str] = (),
    attachment: str = "note",
    text: str = "text",
    steps: int = 20,
) -> Path:
    """A complete recording: 2 ranks of ``steps`` steps, plus a table per name in ``tables`` (one
    str column holding ``text``), an attachment named ``attachment`` and hostile metadata."""
    meta = {"run_id": run_id, "run_name": run_name, "hosts": [host], "command": list(command), "world_size": 2}
    with policy_off(), TmlWriter(path, run_meta=meta) as w:
        for rank in range(2):
            w.append(rank, "step_time", step_rows(steps, rank))
        for i, table in enumerate(tables):
            w.append(0, table, {"ts_ns": np.array([1_760_000_000_000_000_000 + i], np.int64), "label": [text]})
        w.attach(attachment, {"text": text, "run_name": run_name})
        w.attach("environment/rank0", {"host": host, "hostname": host, "python": text})
        w.close(summary={"run_name": run_name, "note": text})
    return path
