"""The regression gate against noise: several runs per side, block bootstrap, noise floor, wall time.

Real .tml files (written with TmlWriter) go through the CLI; the statistics are checked on
seeded synthetic series.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_compare_verdicts import view
from test_diagnosis_support import T0_NS, RunBuilder
from test_report_tml import write_tml
from typer.testing import CliRunner

from replay import compare as cp
from replay import compare_render as cr
from replay import stats as g
from traceml.cli import app
from traceml.errors import ReportError
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.store import StoreView

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["compare", *args])


def gapped_view(
    n: int = 200,
    seed: int = 1,
    *,
    forward: float = 30_000.0,
    gap_us: float = 1_000.0,
    noise: float = 0.03,
    ranks: int = 1,
) -> StoreView:
    """Ranks whose steps are ``gap_us`` apart (time outside any step: eval, logging, a slow batch)."""
    rng = np.random.default_rng(seed)
    b = RunBuilder(seed=seed)
    for rank in range(ranks):
        base = {"dataloader": 1_000.0, "h2d": 0.0, "forward": forward, "backward": 60_000.0, "optimizer": 8_000.0}
        base["residual"] = 1_000.0
        cols = {
            p: np.rint(v * (1 + noise * rng.standard_normal(n)).clip(0.5, 1.5)).astype(np.int64)
            for p, v in base.items()
        }
        step_us = sum(cols.values())
        gaps = np.rint(gap_us * (1 + noise * rng.standard_normal(n)).clip(0.5, 1.5)).astype(np.int64)
        ts = T0_NS + np.cumsum(step_us + gaps) * 1000
        rows = [(i, int(ts[i]), 0, int(step_us[i]), *(int(cols[p][i]) for p in PHASES)) for i in range(n)]
        b.store.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))
    return b.view()


def side(v: StoreView, name: str) -> cp.Side:
    return cp.side_from_view(v, name)


# --- block bootstrap -----------------------------------------------------------------------------


def ar1(n: int, phi: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = e[0]
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return 100 * np.exp(0.05 * x)


def test_block_length_rule() -> None:
    assert g.block_length(1) == 1
    assert g.block_length(200) == 6  # n^(1/3) when the steps are independent
    assert g.block_length(200, dependence_lag=9) == 9  # longer when slow stretches last longer
    assert g.block_length(200, dependence_lag=500) == 14  # never above sqrt(n)
    assert g.block_length(1_000_000, 1) == 100
    assert g.acf_cutoff(np.random.default_rng(0).standard_normal(2000), 44) <= 2
    assert g.acf_cutoff(ar1(2000, 0.9, 1), 44) > 15  # 0.9^k falls below 2/sqrt(n) after ~30 lags


def test_block_indices_are_circular_blocks_and_deterministic() -> None:
    idx = g.block_indices(10, 4, 50, seed=3)
    assert idx.shape == (50, 10)
    assert np.array_equal(idx, g.block_indices(10, 4, 50, seed=3))
    assert not np.array_equal(idx, g.block_indices(10, 4, 50, seed=4))
    # within a block, positions follow one another modulo n
    for row in idx:
        for start in (0, 4):
            block = row[start : start + 4]
            assert np.array_equal(block, (block[0] + np.arange(4)) % 10)


def test_block_bootstrap_widens_the_interval_on_autocorrelated_steps() -> None:
    """AR(1) steps (phi 0.8): step-by-step resampling pretends there are n independent steps."""
    base, new = ar1(400, 0.8, 1), ar1(400, 0.8, 2)
    lag = max(g.acf_cutoff(x, 20) for x in (base, new))
    _, lo_iid, hi_iid = cp.bootstrap_ratio(base, new, block=1, seed=0)
    _, lo_blk, hi_blk = cp.bootstrap_ratio(base, new, block=g.block_length(400, lag), seed=0)
    assert hi_blk - lo_blk > 1.5 * (hi_iid - lo_iid)


def test_block_bootstrap_covers_no_change_on_autocorrelated_aa_pairs() -> None:
    """Seeded A/A pairs of AR(1) runs: the 95 % interval holds 1 in most of them (step-wise, far fewer)."""
    covered = {"block": 0, "iid": 0}
    for s in range(40):
        base, new = ar1(300, 0.7, 100 + s), ar1(300, 0.7, 200 + s)
        lag = max(g.acf_cutoff(x, 17) for x in (base, new))
        for name, block in (("block", g.block_length(300, lag)), ("iid", 1)):
            _, lo, hi = cp.bootstrap_ratio(base, new, block=block, resamples=500, seed=s)
            covered[name] += lo <= 1 <= hi
    assert covered["block"] >= 32  # ~0.9 nominal 0.95 at this length
    assert covered["iid"] < covered["block"] - 5


def test_a_run_of_equal_length_is_resampled_pairwise() -> None:
    x = ar1(145, 0.5, 9)
    assert cp.bootstrap_ratio(x, x.copy()) == (1.0, 1.0, 1.0)


def test_hierarchical_bootstrap_widens_with_between_run_spread() -> None:
    """Three runs per side whose levels differ by a few percent: the interval covers that drift."""
    tight = [view(150, seed=s) for s in (1, 2, 3)]
    loose = [view(150, seed=s, forward=f) for s, f in ((1, 27_000.0), (2, 30_000.0), (3, 33_000.0))]
    news = [view(150, seed=s) for s in (4, 5, 6)]
    a = cp.compare_sides([side(v, "b") for v in tight], [side(v, "n") for v in news])
    b = cp.compare_sides([side(v, "b") for v in loose], [side(v, "n") for v in news])
    sa, sb = cp.metric(a, "step_time"), cp.metric(b, "step_time")
    assert a.drift_covered and b.drift_covered and a.noise_floor_pct == 0
    assert (sb.ci_high or 0) - (sb.ci_low or 0) > 2 * ((sa.ci_high or 0) - (sa.ci_low or 0))


# --- self comparison, zero phases, undecided metrics ----------------------------------------------------


def test_a_run_against_itself_is_equivalent_exit_0(tmp_path: Path) -> None:
    # 150 steps with 30 % jitter: 145 after warm-up, the case that used to exit 3
    tml = write_tml(tmp_path / "run.tml", view(150, seed=3, noise=0.3))
    res = invoke(str(tml), str(tml))
    assert res.exit_code == 0, res.output
    assert "verdict: EQUIVALENT" in res.output
    step = [ln for ln in res.output.splitlines() if ln.startswith("step time")][0]
    assert "+0.0%" in step and "[" not in step  # no interval: every resample pairs the same steps


def test_two_runs_aligned_step_by_step_are_equivalent() -> None:
    v = view(150, seed=3, noise=0.3)
    c = cp.compare_sides(side(v, "a.tml"), side(v, "b.tml"))
    assert c.verdict == cp.EQUIVALENT and c.exit_code == 0
    assert all(m.verdict == cp.EQUIVALENT for m in c.metrics if m.note != cp.NOT_MEASURED)


def test_a_phase_absent_in_the_base_prints_new() -> None:
    base, new = view(seed=1, dataloader=0.0), view(seed=2, dataloader=12_000.0)
    c = cp.compare_sides(side(base, "b"), side(new, "n"))
    dl = cp.metric(c, "phase.dataloader")
    assert dl.base == 0 and dl.new_in_new and dl.ratio is None
    text = cr.render_text(c)
    row = next(ln for ln in text.splitlines() if ln.startswith("dataloader"))
    assert " new " in row and "nan" not in text
    assert dl.verdict == cp.REGRESSION and "absent in base" in dl.note  # 12 ms is > 5 % of a ~100 ms step
    assert "dataloader +12.0 ms (new)" in c.reason
    json.dumps(c.to_dict(), allow_nan=False)


def test_verdict_line_names_the_phase_that_moved_most() -> None:
    c = cp.compare_sides(side(view(seed=1), "b"), side(view(seed=2, residual=25_000.0), "n"))
    assert c.verdict == cp.REGRESSION
    assert c.reason.startswith("step time +24%: residual +23.9 ms (+2")


def test_undecided_metric_says_how_many_steps_would_decide_it() -> None:
    c = cp.compare_sides(
        side(view(40, seed=1, noise=0.3), "b"), side(view(40, seed=2, noise=0.3), "n"), noise_floor_pct=0
    )
    step = cp.metric(c, "step_time")
    assert step.verdict == cp.INCONCLUSIVE and step.steps_to_decide is not None
    assert step.steps_to_decide > step.n_base
    assert f"~{step.steps_to_decide} steps per run would decide it" in c.reason
    # with that many steps (same jitter), the verdict is decided
    long = cp.compare_sides(
        side(view(step.steps_to_decide * 2, seed=1, noise=0.3), "b"),
        side(view(step.steps_to_decide * 2, seed=2, noise=0.3), "n"),
        noise_floor_pct=0,
    )
    assert cp.metric(long, "step_time").verdict != cp.INCONCLUSIVE


def test_steps_to_decide_rule() -> None:
    # estimate +20 % past a 5 % gate, lower bound at +2 %: the lower half-width must shrink from 18 to 20 points
    assert g.steps_to_decide(100, 1.20, 1.02, 1.40, 0.05, 0.0) is None  # already decided (lo > 1)
    assert g.steps_to_decide(100, 1.20, 0.95, 1.45, 0.05, 0.0) == math.ceil(100 * (0.25 / 0.20) ** 2)
    assert g.steps_to_decide(100, 1.00, 0.90, 1.10, 0.05, 0.0) == 400  # equivalence needs half the width
    assert g.steps_to_decide(100, 1.07, 1.03, 1.11, 0.05, 0.10) is None  # between gate and floor: more runs


# --- noise floor ---------------------------------------------------------------------------------


def test_one_run_per_side_says_drift_is_not_covered_and_applies_the_floor() -> None:
    base, new = side(view(seed=1), "b"), side(view(seed=2, forward=38_000.0), "n")  # about +8 %
    c = cp.compare_sides(base, new)
    assert not c.drift_covered and c.noise_floor_pct == cp.DEFAULT_NOISE_FLOOR_PCT
    assert c.verdict == cp.INCONCLUSIVE and c.exit_code == 3
    assert "NOT covered" in cr.render_text(c) and "noise floor" in c.reason
    assert cp.compare_sides(base, new, noise_floor_pct=0).verdict == cp.REGRESSION
    assert cp.compare_sides(base, new, noise_floor_pct=5).verdict == cp.REGRESSION
    assert cp.compare_sides(base, new, noise_floor_pct=9).verdict == cp.INCONCLUSIVE
    # a clear slowdown clears the default floor
    assert cp.compare_sides(base, side(view(seed=2, forward=60_000.0), "n")).verdict == cp.REGRESSION


def test_noise_floor_measured_from_an_aa_pair() -> None:
    base = side(view(seed=1), "base.tml")
    drifted = side(view(seed=5, forward=34_000.0), "base2.tml")  # the same code measured 4 % slower
    new = side(view(seed=2, forward=40_000.0), "new.tml")  # about +10 %
    c = cp.compare_sides(base, new, aa=[drifted])
    floor = cp.metric(c, "step_time").noise_floor
    assert 0.03 < floor < 0.05 and "A/A pair" in c.floor_source
    assert c.verdict == cp.REGRESSION
    # drift as large as the change: not called
    wild = side(view(seed=5, forward=42_000.0), "base2.tml")
    assert cp.compare_sides(base, new, aa=[wild]).verdict == cp.INCONCLUSIVE
    with pytest.raises(ReportError, match="either --noise-floor or --aa"):
        cp.compare_sides(base, new, aa=[drifted], noise_floor_pct=3)
    with pytest.raises(ReportError, match="noise-floor"):
        cp.compare_sides(base, new, noise_floor_pct=-1)


def test_several_base_runs_and_one_new_run_measure_the_floor_from_the_base_spread() -> None:
    bases = [side(view(seed=s, forward=f), f"b{s}") for s, f in ((1, 29_000.0), (2, 30_000.0), (3, 31_000.0))]
    c = cp.compare_sides(bases, side(view(seed=4, forward=34_000.0), "n"))
    floor = cp.metric(c, "step_time").noise_floor
    assert 0.005 < floor < 0.03 and "spread of the base side's 3 runs" in c.floor_source
    assert "covered on one side only" in cr.render_text(c)


# --- throughput and time outside steps -----------------------------------------------------------------


def test_throughput_is_measured_over_wall_time() -> None:
    s = side(gapped_view(gap_us=20_000.0), "b")  # steps of ~100 ms, 20 ms apart
    tput = cp.metric(cp.compare_sides(s, s), "throughput")
    assert tput.base == pytest.approx(1000 / 120, rel=0.02)  # not 1000 / 100
    share = cp.metric(cp.compare_sides(s, s), "outside_share")
    assert share.base == pytest.approx(20 / 120, rel=0.05)


def test_a_slowdown_between_steps_is_caught(tmp_path: Path) -> None:
    """Step time unchanged, 80 ms more outside each step: throughput and outside share regress."""
    base = write_tml(tmp_path / "base.tml", gapped_view(seed=1, gap_us=1_000.0))
    new = write_tml(tmp_path / "new.tml", gapped_view(seed=2, gap_us=81_000.0))
    res = invoke(str(base), str(new), "--out", str(tmp_path / "cmp"))
    assert res.exit_code == 4, res.output
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    by = {m["name"]: m for m in doc["metrics"]}
    assert by["step_time"]["verdict"] == "EQUIVALENT"
    assert by["throughput"]["verdict"] == "REGRESSION" and by["throughput"]["change_pct"] < -40
    assert by["outside_share"]["verdict"] == "REGRESSION" and by["outside_share"]["change_unit"] == "pp"
    assert by["outside_share"]["change_pct"] > 40
    assert "time outside steps" in doc["reason"]


# --- the CLI with several runs per side ------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("runs")
    return {
        "base": [write_tml(d / f"base{i}.tml", view(120, seed=10 + i)) for i in range(3)],
        "same": [write_tml(d / f"same{i}.tml", view(120, seed=20 + i)) for i in range(3)],
        "slow": [write_tml(d / f"slow{i}.tml", view(120, seed=30 + i, forward=55_000.0)) for i in range(3)],
    }


def repeat(flag: str, paths: list[Path]) -> list[str]:
    return [a for p in paths for a in (flag, str(p))]


def test_cli_several_runs_per_side(runs: dict[str, list[Path]], tmp_path: Path) -> None:
    res = invoke(*repeat("--base", runs["base"]), *repeat("--new", runs["same"]), "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert "base: 3 runs:" in res.output and "new:  3 runs:" in res.output
    assert "run-to-run drift: covered" in res.output
    doc = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert doc["schema_version"] == 2
    assert doc["base"]["run_count"] == 3 and len(doc["new"]["runs"]) == 3
    assert doc["drift_covered"] is True and doc["noise_floor"]["pct"] == 0
    assert "3 base runs, 3 new runs" in (tmp_path / "o" / "compare.md").read_text()
    res = invoke(*repeat("--base", runs["base"]), *repeat("--new", runs["slow"]))
    assert res.exit_code == 4, res.output
    assert "step time +2" in res.output and "forward +25." in res.output


def test_cli_mixes_positionals_and_options(runs: dict[str, list[Path]]) -> None:
    res = invoke(str(runs["base"][0]), str(runs["slow"][0]), "--base", str(runs["base"][1]))
    assert res.exit_code == 4, res.output
    assert "base: 2 runs:" in res.output and "new:  1 run:" in res.output


def test_cli_noise_floor_and_aa_options(runs: dict[str, list[Path]]) -> None:
    b, s = str(runs["base"][0]), str(runs["slow"][0])
    assert invoke(b, s, "--noise-floor", "60").exit_code == 3  # +25 % is within a 60 % floor
    res = invoke(b, s, "--aa", str(runs["base"][1]))
    assert res.exit_code == 4 and "A/A pair" in res.output
    res = invoke(b, s, "--aa", str(runs["base"][1]), "--noise-floor", "3")
    assert res.exit_code == 2 and "not both" in res.output  # usage errors exit 2
    assert invoke(b, s, "--noise-floor", "-2").exit_code == 2
    res = invoke("--base", b)
    assert res.exit_code == 2 and "--new" in res.output
    res = invoke("--base", b, "--new", s, "--new", b, "--paired")
    assert res.exit_code == 2 and "as many candidate runs as baseline runs" in res.output
    res = invoke("--base", b, "--base", str(runs["base"][1]), "--new", s, "--new", str(runs["slow"][1]), "--paired")
    assert res.exit_code == 4 and "run pairs (--paired)" in res.output


def test_paired_runs_cancel_drift_both_sides_saw() -> None:
    """Three back-to-back pairs on a host whose load moves +-20 % between pairs, new 12 % slower:
    unpaired, the drift swamps the change; paired, the i-th runs are resampled together and it cancels."""
    loads = (0.8, 1.0, 1.2)
    bases = [
        side(view(150, seed=40 + i, forward=30_000.0 * f, backward=60_000.0 * f), f"b{i}") for i, f in enumerate(loads)
    ]
    news = [
        side(view(150, seed=50 + i, forward=42_000.0 * f, backward=60_000.0 * f), f"n{i}") for i, f in enumerate(loads)
    ]
    unpaired = cp.compare_sides(bases, news)
    paired = cp.compare_sides(bases, news, paired=True)
    assert unpaired.verdict == cp.INCONCLUSIVE
    assert paired.verdict == cp.REGRESSION and paired.paired and paired.to_dict()["paired"] is True
    assert "run pairs (--paired)" in cr.render_text(paired)
    with pytest.raises(ReportError, match="as many --new runs as --base runs"):
        cp.compare_sides(bases, news[:2], paired=True)


def test_steps_to_decide_is_not_printed_when_absurd() -> None:
    assert g.steps_to_decide(100, 1.20, 0.95, 1.45, 0.05, 0.0) == 157
    assert g.steps_to_decide(100, 1.02, 0.5, 1.6, 0.05, 0.0) is None  # > 100x the steps there are


def test_summary_inputs_carry_measured_throughput_and_the_outside_share(tmp_path: Path) -> None:
    from traceml.diagnosis import build_summary

    paths = []
    for name, gap in (("base", 1_000.0), ("new", 81_000.0)):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(build_summary(gapped_view(seed=len(paths) + 1, gap_us=gap)), allow_nan=False))
        paths.append(p)
    c = cp.compare_files(paths[0], paths[1])
    assert c.method == "approximate"
    share = cp.metric(c, "outside_share")
    assert share.verdict == cp.REGRESSION and share.note.startswith("point comparison")
    assert share.base is not None and share.base < 0.02 and share.new is not None and share.new > 0.4
    assert cp.metric(c, "throughput").verdict == cp.REGRESSION
    assert cp.metric(c, "step_time").verdict == cp.EQUIVALENT
    assert c.exit_code == 4


@pytest.mark.parametrize("ranks", [1, 3])
def test_throughput_and_outside_share_are_the_reports_figures(ranks: int) -> None:
    """One answer per question: compare quotes the throughput and outside-step share the views define."""
    from traceml.views.measures import job_measures
    from traceml.views.steps import step_data

    v = gapped_view(300, seed=7, gap_us=15_000.0, noise=0.2, ranks=ranks)
    m = job_measures(step_data(v), parts=False)
    c = cp.compare_sides(side(v, "a"), side(v, "b"))
    assert cp.metric(c, "throughput").base == pytest.approx(m.throughput_steps_per_s, rel=1e-6)
    assert cp.metric(c, "outside_share").base == pytest.approx(m.outside_share, rel=1e-6)
