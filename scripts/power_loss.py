"""Power loss, simulated: >= 1,000 randomised crash images of ``.tml`` recordings, read back (no assertions).

    .venv/bin/python scripts/power_loss.py [--trials 1200] [--seed 0]

The shim and the checks are in ``tests/crashsim.py`` (its docstring says what each crash mode
does); ``tests/test_format_power_loss.py`` runs a short version of this.  Prints a table per
crash mode and every failure found; exits 1 when any trial failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from crashsim import MODES, run_trials  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tally = run_trials(Path(tmp), args.trials, seed=args.seed)
    elapsed = time.perf_counter() - t0
    print(f"{tally.trials:,} crash images (seed {args.seed}) in {elapsed:.1f} s")
    print(f"{'mode':8} {'trials':>7}")
    for mode in MODES:
        print(f"{mode:8} {tally.by_mode[mode]:>7,}")
    print()
    rows = [
        ("opened by the reader", tally.opened),
        ("refused, nothing synced yet (a traceml error)", tally.refused_empty),
        ("reader crashes (or refused synced data)", len(tally.crashes)),
        ("synced rows lost", len(tally.lost_synced)),
        ("wrong or invented rows", len(tally.wrong_rows)),
        ("fsync window misses", len(tally.window_misses)),
        ("rows synced before the cuts", tally.rows_synced),
        ("rows recovered", tally.rows_recovered),
    ]
    for label, value in rows:
        print(f"{label:48} {value:>12,}")
    print("integrity verdicts:", ", ".join(f"{k} {v:,}" for k, v in sorted(tally.verdicts.items())))
    for item in tally.crashes + tally.lost_synced + tally.wrong_rows + tally.window_misses:
        print("FAIL", item)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
