"""``traceml.summary(source)``: a run's summary as flat metric keys, from a recording or a summary.json.

Loads a ``.tml`` through the replay engine (imported here, lazily: ``import traceml`` stays light).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from traceml.errors import ReplayError

#: a summary.json larger than this is refused (a real one is a few hundred KiB at most)
MAX_SUMMARY_JSON_BYTES = 64 << 20
#: where ``traceml run`` puts its recordings (``<runs_dir>/<run name>/run.tml``) and ``traceml runs`` looks
DEFAULT_RUNS_DIR = "traceml_runs"


def latest_recording(runs_dir: str | os.PathLike[str] = DEFAULT_RUNS_DIR) -> Path:
    """The newest ``<runs_dir>/*/run.tml`` (by modification time)."""
    runs = Path(runs_dir)
    found = sorted(runs.glob("*/run.tml"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    if not found:
        raise ReplayError(
            f"no recording found under {str(runs)!r} (expected {runs}/<run>/run.tml from `traceml run`);"
            " pass the recording's path: traceml.summary('path/to/run.tml')"
        )
    return found[-1]


def load_nested(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The nested summary (docs/summary.schema.json) of ``source``: a ``.tml``, a summary.json, a
    report directory, a summary dict, or None for the newest recording under ``traceml_runs/``."""
    if isinstance(source, Mapping):
        return dict(source)
    path = latest_recording() if source is None else Path(source)
    if path.is_dir():
        for name in ("summary.json", "run.tml"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ReplayError(f"{str(path)!r} is a directory without summary.json or run.tml; pass a .tml file")
    if path.suffix == ".json":
        try:
            size = path.stat().st_size
            if size > MAX_SUMMARY_JSON_BYTES:
                raise ReplayError(
                    f"{str(path)!r} is {size} bytes; a summary.json is expected under {MAX_SUMMARY_JSON_BYTES} bytes"
                )
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReplayError(
                f"cannot read summary {str(path)!r}: {exc}; expected summary.json of `traceml report`"
            ) from exc
        if not isinstance(doc, dict):
            raise ReplayError(f"{str(path)!r} holds a {type(doc).__name__}; expected the summary object")
        return doc
    import replay

    with replay.open(path, progress=False) as rec:
        return rec.summary(flat=False)


def summary(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> dict[str, float | int]:
    """A run's summary as flat ``traceml/<section>/<metric>`` keys with numeric values.

    ``wandb.run.summary.update(traceml.summary(path))`` and ``mlflow.log_metrics(traceml.summary(path))``
    take it as it is.  ``source``: a ``.tml`` recording, a summary.json, a report directory, a
    summary dict, or None for the newest recording under ``./traceml_runs/``.
    """
    from traceml.diagnosis.flat import flatten_summary

    return flatten_summary(load_nested(source))
