"""Power loss, simulated (short run; ``scripts/power_loss.py`` runs >= 1,000 trials): every synced
row survives every kind of cut, the reader never crashes, and the fsync window holds."""

from __future__ import annotations

import random
from pathlib import Path

from crashsim import MODES, Recording, Tally, check_image, crash_image, record, run_trials

from traceml.format import open_recording


def test_randomised_power_cuts_lose_no_synced_row(tmp_path: Path) -> None:
    tally = run_trials(tmp_path, trials=48, seed=18)
    assert tally.trials == 48 and set(tally.by_mode) == set(MODES)
    assert tally.crashes == []
    assert tally.lost_synced == []
    assert tally.wrong_rows == []
    assert tally.window_misses == []
    assert tally.opened > 30 and tally.rows_synced > 0
    assert tally.rows_recovered >= tally.rows_synced


def test_the_checks_catch_a_lost_synced_row(tmp_path: Path) -> None:
    """The harness can fail: an image that lost synced bytes is reported, not passed."""
    rng = random.Random(3)
    rec: Recording = record(tmp_path / "r.tml", rng)
    syncs = [i for i, op in enumerate(rec.ops) if op.kind == "sync" and op.rows_synced > 0]
    k = syncs[-1] + 1
    image, rows_synced, cut_t = crash_image(rec, k, "drop", rng)
    tally = Tally()
    (tmp_path / "whole.tml").write_bytes(image)
    with open_recording(tmp_path / "whole.tml") as reader:
        seg = next(s for s in reader.segments if (0, "step_time") in s.rows)
    mid = seg.offset + seg.length // 2
    damaged = image[:mid] + bytes(16) + image[mid + 16 :]  # a synced data segment destroyed after all
    check_image(damaged, tmp_path / "i.tml", rec, rows_synced, cut_t, tally, "damaged on purpose")
    assert tally.lost_synced or tally.crashes
    # and one cut well after a sync, checked against a window of 0 s: the unsynced rows are misses
    later = next((i for i, op in enumerate(rec.ops) if op.kind == "write" and i > k + 5), len(rec.ops) - 1)
    image, rows_synced, cut_t = crash_image(rec, later, "drop", rng)
    strict = Tally()
    rec.window_s = 0.0
    check_image(image, tmp_path / "j.tml", rec, rows_synced, cut_t, strict, "no window")
    assert strict.window_misses and not strict.lost_synced
