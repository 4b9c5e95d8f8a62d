"""Log a finished run into Weights & Biases or MLflow: summary metrics, the verdict, report files.

Called by the CLI after training (``--log-to``), never by the ranks; each tool's own environment chooses
where the data goes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traceml.diagnosis.flat import flatten_summary, safe_part, verdict
from traceml.errors import ExportError, TracemlError
from traceml.exports import require

TRACKERS = ("wandb", "mlflow")
#: artifact files larger than this are left out (a report is a few MB; a .tml may be GBs)
MAX_ARTIFACT_BYTES = 256 << 20


@dataclass(frozen=True)
class Logged:
    tracker: str
    run: str
    metrics: int
    artifacts: list[str]
    where: str


def _artifacts(files: Sequence[Path]) -> list[Path]:
    out = []
    for f in files:
        try:
            if f.is_file() and f.stat().st_size <= MAX_ARTIFACT_BYTES:
                out.append(f)
        except OSError:
            continue
    return out


def log_to(tracker: str, summary: Mapping[str, Any], files: Sequence[Path] = (), *, run_name: str = "") -> Logged:
    """Log ``summary`` (nested, as ``build_summary`` returns it) and ``files`` into ``tracker``."""
    if tracker == "wandb":
        return log_to_wandb(summary, files, run_name=run_name)
    if tracker == "mlflow":
        return log_to_mlflow(summary, files, run_name=run_name)
    raise ExportError(f"--log-to {tracker!r}: expected one of {', '.join(TRACKERS)}")


def log_to_wandb(summary: Mapping[str, Any], files: Sequence[Path] = (), *, run_name: str = "") -> Logged:
    wandb = require("wandb", "wandb", "wandb")
    flat = flatten_summary(summary)
    v = verdict(summary)
    name = run_name or str(summary.get("run", {}).get("name", "") or "traceml")
    run_id = os.environ.get("WANDB_RUN_ID") or None
    try:
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "traceml",
            name=None if run_id else name,
            id=run_id,
            resume="allow" if run_id else None,
            job_type="traceml",
        )
        try:
            run.summary.update(flat)
            run.summary.update(
                {
                    "traceml/verdict": v["kind"],
                    "traceml/verdict_severity": v["severity"],
                    "traceml/verdict_summary": v["summary"],
                }
            )
            kept = _artifacts(files)
            if kept:
                artifact = wandb.Artifact(
                    f"traceml-{safe_part(name)}", type="traceml-report", metadata={"verdict": v["kind"]}
                )
                for f in kept:
                    artifact.add_file(str(f), name=f.name)
                run.log_artifact(artifact)
            where = str(getattr(run, "dir", "") or "")
            logged = Logged("wandb", str(run.id), len(flat), [f.name for f in kept], where)
        finally:
            run.finish()
    except TracemlError:
        raise
    except Exception as exc:  # wandb raises its own errors, OSError, ValueError...
        raise ExportError(
            f"W&B refused the run ({type(exc).__name__}: {exc}); check WANDB_API_KEY / `wandb login`,"
            " or set WANDB_MODE=offline and `wandb sync` later"
        ) from exc
    return logged


def log_to_mlflow(summary: Mapping[str, Any], files: Sequence[Path] = (), *, run_name: str = "") -> Logged:
    mlflow = require("mlflow", "mlflow", "mlflow-skinny")
    flat = flatten_summary(summary)
    v = verdict(summary)
    name = run_name or str(summary.get("run", {}).get("name", "") or "traceml")
    try:
        active = mlflow.active_run()
        # MLFLOW_RUN_ID (read by start_run itself) resumes the script's run; otherwise a new one
        ctx = mlflow.start_run(run_name=None if os.environ.get("MLFLOW_RUN_ID") else name, nested=active is not None)
        with ctx as run:
            mlflow.log_metrics({k: float(x) for k, x in flat.items()})
            mlflow.set_tags(
                {
                    "traceml.verdict": v["kind"],
                    "traceml.verdict_severity": v["severity"],
                    "traceml.verdict_summary": v["summary"][:5000],
                    "traceml.run_id": str(summary.get("run", {}).get("id", "") or ""),
                }
            )
            kept = _artifacts(files)
            for f in kept:
                mlflow.log_artifact(str(f), artifact_path="traceml")
            logged = Logged(
                "mlflow", str(run.info.run_id), len(flat), [f.name for f in kept], mlflow.get_tracking_uri()
            )
    except TracemlError:
        raise
    except Exception as exc:  # MlflowException, OSError, requests errors...
        raise ExportError(
            f"MLflow refused the run ({type(exc).__name__}: {exc}); check MLFLOW_TRACKING_URI"
            " (and MLFLOW_EXPERIMENT_NAME / MLFLOW_RUN_ID if set)"
        ) from exc
    return logged
