"""Terminal renderers: golden snapshots at a fixed width, plus the number formats.

Regenerate on purpose with ``TRACEML_REGEN_GOLDEN=1 pytest tests/test_terminal_render.py`` and
review the diff of ``tests/golden/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from traceml.renderers.terminal import MAX_RANK_ROWS, fmt_bytes, fmt_pct, fmt_seconds, fmt_us, render_final, render_live
from traceml.schema import PHASES, PROCESS, STEP_MEMORY, STEP_TIME, SYSTEM, SYSTEM_GPU, rows_to_columns
from traceml.store import ColumnStore
from traceml.views import final_model, live_model

GOLDEN = Path(__file__).parent / "golden"
T0 = 1_700_000_000_000_000_000
MS = 1_000_000


def to_text(renderable: object, width: int = 100) -> str:
    console = Console(record=True, width=width, color_system=None, force_terminal=False, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    text = console.export_text()
    console.file.close()
    return text


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("TRACEML_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; create it with TRACEML_REGEN_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from the golden file (TRACEML_REGEN_GOLDEN=1)"


def fill_rank(store: ColumnStore, rank: int, steps: int, slow: float = 1.0, gpu: bool = False) -> None:
    rows = []
    for i in range(steps):
        phases = {"dataloader": 400 + 10 * (i % 5), "h2d": 150 if gpu else 0, "forward": int(2100 * slow)}
        phases |= {"backward": int(4300 * slow) + i % 3, "optimizer": 700, "residual": 120}
        values = [phases[p] for p in PHASES]
        rows.append((i, T0 + (i + 1) * 10 * MS, 0, sum(values), *values))
    store.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))
    gpu_alloc = (3 << 30) + rank * (1 << 28) if gpu else -1
    store.append(
        rank,
        "process",
        rows_to_columns(
            PROCESS, [(T0 + steps * 10 * MS, 97.0, (900 << 20) + rank * (16 << 20), 20, 64, gpu_alloc, -1, -1)]
        ),
    )
    if gpu:
        store.append(rank, "step_memory", rows_to_columns(STEP_MEMORY, [(steps - 1, T0, (5 << 30) + rank, 6 << 30)]))
    store.update_rank(rank, host="node-a", node_rank=rank // 4, local_rank=rank % 4, pid=4000 + rank, state="connected")


def cpu_run() -> ColumnStore:
    store = ColumnStore(
        meta={
            "run_name": "mlp-cpu",
            "start_ns": T0,
            "expected_ranks": 1,
            "status": "running",
            "recording_path": "traceml_runs/mlp-cpu/run.tml",
            "recording_bytes": 48_213,
        }
    )
    fill_rank(store, 0, 240)
    store.append(0, "system", rows_to_columns(SYSTEM, [(T0 + 2 * 10**9, 0, 63.5, 3 << 30, 16 << 30)]))
    return store


def gpu_run() -> ColumnStore:
    store = ColumnStore(
        meta={
            "run_name": "ddp-gpu",
            "start_ns": T0,
            "expected_ranks": 4,
            "status": "running",
            "recording_path": "/data/runs/ddp-gpu/run.tml",
            "recording_bytes": 3 << 20,
            "recording_error": "writing run.tml: [Errno 28] No space left on device",
        }
    )
    for rank in range(3):
        fill_rank(store, rank, 150, slow=1.3 if rank == 2 else 1.0, gpu=True)
    store.update_rank(1, drops={"process": 12})
    store.update_rank(2, state="died", died_ns=T0)
    gpu_rows = [(T0 + 10**9, 0, g, 91.0 - g, (20 + g) << 30, 80 << 30, 65.0, 300.0, 400.0) for g in range(3)]
    store.append(0, "system_gpu", rows_to_columns(SYSTEM_GPU, gpu_rows))
    store.append(0, "system", rows_to_columns(SYSTEM, [(T0 + 10**9, 0, 41.0, 120 << 30, 512 << 30)]))
    return store


def test_live_cpu_single_rank_golden() -> None:
    check_golden("live_cpu.txt", to_text(render_live(live_model(cpu_run().snapshot()))))


def test_live_gpu_multi_rank_golden() -> None:
    check_golden("live_gpu_ranks.txt", to_text(render_live(live_model(gpu_run().snapshot()))))


def test_live_waiting_golden() -> None:
    store = ColumnStore(meta={"run_name": "starting", "expected_ranks": 2, "recording_path": ""})
    check_golden("live_waiting.txt", to_text(render_live(live_model(store.snapshot()))))


def test_final_ok_golden() -> None:
    store = cpu_run()
    store.attach("exit", {"exit_code": 0, "status": "ok", "duration_s": 31.42, "signal": ""})
    store.attach(
        "summary",
        {
            "diagnosis": {
                "primary": {"kind": "COMPUTE_BOUND", "severity": "info", "rank": None, "summary": "compute is 88%"},
                "findings": [],
            }
        },
    )
    store.update_rank(0, state="finished", exit_status="ok")
    check_golden("final_ok.txt", to_text(render_final(final_model(store.snapshot()))))


def test_final_failed_golden() -> None:
    store = gpu_run()
    store.attach("exit", {"exit_code": 1, "status": "failed", "duration_s": 3725.0, "signal": ""})
    findings = [
        {"kind": "STRAGGLER", "severity": "critical", "rank": 2, "summary": "rank 2 is 30% slower (compute)"},
        {"kind": "INPUT_BOUND", "severity": "warn", "rank": None, "summary": "input wait 11% of the step"},
    ]
    store.attach("summary", {"diagnosis": {"primary": findings[0], "findings": findings}})
    check_golden("final_failed.txt", to_text(render_final(final_model(store.snapshot()))))


def test_many_ranks_show_unhealthy_and_slowest_first() -> None:
    store = ColumnStore(meta={"expected_ranks": 12})
    for rank in range(12):
        fill_rank(store, rank, 5, slow=1.0 + rank / 100)
    store.update_rank(0, state="died")
    text = to_text(render_live(live_model(store.snapshot())))
    rows = [line for line in text.splitlines() if len(line.split()) > 1 and line.split()[1].isdigit()]  # table rows
    shown = [int(line.split()[1]) for line in rows if " connected " in line or " died " in line]
    # the died rank, then the slowest healthy ranks (11, 10, ...), in rank order
    assert shown == sorted([0, *range(12 - (MAX_RANK_ROWS - 1), 12)])
    assert "4 more ranks not shown" in text
    assert "step median over 12 ranks: median" in " ".join(text.split())  # and the distribution of all of them


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (-1, "-"),
        (float("nan"), "-"),
        (0, "0us"),
        (999, "999us"),
        (1000, "1.00ms"),
        (12_345, "12.3ms"),
        (456_000, "456ms"),
        (2_500_000, "2.50s"),
    ],
)
def test_fmt_us(us: float, text: str) -> None:
    assert fmt_us(us) == text


@pytest.mark.parametrize(("n", "text"), [(-1, "-"), (0, "0B"), (1023, "1023B"), (1536, "1.5KiB"), (5 << 30, "5.0GiB")])
def test_fmt_bytes(n: int, text: str) -> None:
    assert fmt_bytes(n) == text


def test_fmt_seconds_and_pct() -> None:
    assert [fmt_seconds(s) for s in (float("nan"), 5.25, 125, 3725)] == ["-", "5.2s", "2m05s", "1h02m"]
    assert (fmt_pct(float("nan")), fmt_pct(12.6)) == ("-", "13%")
