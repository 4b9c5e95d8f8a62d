"""replay.compare on synthetic distributions: statistics, verdicts, exit codes, summary.json inputs."""

from __future__ import annotations

import numpy as np
import pytest
from test_diagnosis_support import GiB, RunBuilder

from replay import compare as cp
from replay import stats
from traceml.errors import ReportError
from traceml.store import StoreView


def view(n: int = 200, seed: int = 1, *, forward: float = 30_000.0, noise: float = 0.05, **kw) -> StoreView:
    return RunBuilder(seed=seed).steps(0, n, forward=forward, noise=noise, **kw).view()


def compare(base: StoreView, new: StoreView, **kw) -> cp.Comparison:
    return cp.compare_sides(cp.side_from_view(base, "base.tml"), cp.side_from_view(new, "new.tml"), **kw)


# --- statistics ---------------------------------------------------------------------------------


def test_bootstrap_interval_is_seeded_and_covers_the_true_ratio() -> None:
    rng = np.random.default_rng(7)
    base = rng.lognormal(np.log(100), 0.1, 400)
    new = rng.lognormal(np.log(110), 0.1, 400)
    a = cp.bootstrap_ratio(base, new, seed=3)
    assert a == cp.bootstrap_ratio(base, new, seed=3)
    assert a != cp.bootstrap_ratio(base, new, seed=4)
    ratio, lo, hi = a
    assert lo < 1.10 < hi
    assert lo < ratio < hi
    assert hi - lo < 0.05


def test_cliffs_delta_extremes() -> None:
    x = np.arange(50.0)
    assert cp.cliffs_delta(x, x) == 0.0
    assert cp.cliffs_delta(x, x + 100) == 1.0
    assert cp.cliffs_delta(x + 100, x) == -1.0


@pytest.mark.parametrize(
    ("ratio", "lo", "hi", "higher_is_better", "expected"),
    [
        (1.20, 1.15, 1.25, False, cp.REGRESSION),
        (1.06, 1.01, 1.12, False, cp.REGRESSION),  # estimate past the gate, interval excludes 1
        (1.06, 0.98, 1.14, False, cp.INCONCLUSIVE),  # could be no change
        (1.03, 1.02, 1.04, False, cp.EQUIVALENT),  # real but within the gate
        (0.80, 0.75, 0.85, False, cp.IMPROVEMENT),
        (0.80, 0.75, 0.85, True, cp.REGRESSION),  # throughput down 20 %
        (1.00, 0.90, 1.10, False, cp.INCONCLUSIVE),
        (float("nan"), 1.0, 1.0, False, cp.INCONCLUSIVE),
    ],
)
def test_verdict_rules(ratio: float, lo: float, hi: float, higher_is_better: bool, expected: str) -> None:
    assert cp.verdict_for(ratio, lo, hi, 0.05, higher_is_better) == expected


# --- recordings (views) ---------------------------------------------------------------------------


def test_clear_regression_exits_4() -> None:
    c = compare(view(seed=1), view(seed=2, forward=45_000.0))
    assert c.verdict == cp.REGRESSION and c.exit_code == cp.EXIT_REGRESSION == 4
    step = cp.metric(c, "step_time")
    assert step.verdict == cp.REGRESSION
    assert 10 < step.change_pct < 20
    assert step.effect_size is not None and step.effect_size > 0.9
    assert cp.metric(c, "throughput").verdict == cp.REGRESSION
    assert cp.metric(c, "phase.forward").verdict == cp.REGRESSION
    assert cp.metric(c, "phase.backward").verdict == cp.EQUIVALENT
    assert c.method == "bootstrap"
    assert c.aligned == (5, 199, 195)


def test_same_distribution_is_equivalent_exit_0() -> None:
    c = compare(view(seed=1), view(seed=2))
    assert c.verdict == cp.EQUIVALENT and c.exit_code == 0
    assert abs(cp.metric(c, "step_time").change_pct) < 2


def test_improvement_exits_0() -> None:
    c = compare(view(seed=1), view(seed=2, forward=15_000.0))
    assert c.verdict == cp.IMPROVEMENT and c.exit_code == 0


def test_tiny_samples_are_inconclusive_exit_3() -> None:
    c = compare(view(8, seed=1), view(8, seed=2, forward=60_000.0))
    assert c.verdict == cp.INCONCLUSIVE and c.exit_code == cp.EXIT_INCONCLUSIVE == 3
    assert "too few" in cp.metric(c, "step_time").note


def test_noisy_samples_are_inconclusive_exit_3() -> None:
    c = compare(view(40, seed=1, noise=0.4), view(40, seed=2, forward=36_000.0, noise=0.4))
    assert c.exit_code == 3
    step = cp.metric(c, "step_time")
    assert step.verdict == cp.INCONCLUSIVE
    # 35 steps with 40 % jitter: the interval is wide, and with one run per side the +10 % noise floor is not cleared
    assert step.ci_low is not None and step.ci_high is not None and step.ci_high - step.ci_low > 0.1
    assert step.ci_low < 1 + step.noise_floor


def test_gate_is_configurable() -> None:
    base, new = view(seed=1), view(seed=2, forward=36_000.0)  # about +6 %
    # one run per side: the default 10 % noise floor is not cleared, so it cannot be told from drift
    assert compare(base, new, max_regression_pct=5).exit_code == 3
    assert compare(base, new, max_regression_pct=5, noise_floor_pct=0).exit_code == 4
    assert compare(base, new, max_regression_pct=10).exit_code == 0
    with pytest.raises(ReportError, match="positive percentage"):
        compare(base, new, max_regression_pct=0)


def test_results_are_deterministic_for_a_seed() -> None:
    base, new = view(seed=1), view(seed=2, forward=33_000.0)
    assert compare(base, new, seed=5).to_dict() == compare(base, new, seed=5).to_dict()


def test_peak_memory_regression_is_gated() -> None:
    base = RunBuilder(seed=1).steps(0, 100).step_memory(0, np.full(100, 10 * GiB)).view()
    new = RunBuilder(seed=2).steps(0, 100).step_memory(0, np.full(100, 13 * GiB)).view()
    c = compare(base, new)
    mem = cp.metric(c, "peak_gpu_memory")
    assert mem.verdict == cp.REGRESSION and mem.change_pct == pytest.approx(30.0)
    assert c.exit_code == 4
    assert "peak GPU memory" in c.reason


def test_steps_are_aligned_on_common_step_numbers() -> None:
    c = compare(view(300, seed=1), view(120, seed=2))
    assert c.aligned == (5, 119, 115)  # both skip 5 warm-up steps; the base's steps past 119 are not compared
    assert cp.metric(c, "step_time").n_base == cp.metric(c, "step_time").n_new == 115


@pytest.mark.parametrize("n", [9, 10, 57])
@pytest.mark.parametrize("q", [0.5, 0.95])
def test_order_statistic_bootstrap_matches_brute_force_resampling(n: int, q: float) -> None:
    x = np.random.default_rng(n).lognormal(0, 0.3, n)
    fast = stats.bootstrap_quantile(x, q, 20_000, np.random.default_rng(1))
    brute = np.quantile(x[np.random.default_rng(2).integers(0, n, size=(20_000, n))], q, axis=1)
    # same sampling distribution: its 2.5 / 50 / 97.5 percentiles agree to within sampling error
    assert np.allclose(np.quantile(fast, [0.025, 0.5, 0.975]), np.quantile(brute, [0.025, 0.5, 0.975]), rtol=0.03)
    if q == 0.5 and n % 2:  # an odd sample's median is one of its values, in every resample
        assert set(np.unique(fast)) <= set(x)


def test_memory_with_few_samples_compares_peaks() -> None:
    base = RunBuilder(seed=1).steps(0, 100).process(0, [1 * GiB] * 5).view()
    same = RunBuilder(seed=2).steps(0, 100).process(0, [1 * GiB] * 4).view()
    more = RunBuilder(seed=3).steps(0, 100).process(0, [1.5 * GiB] * 4).view()
    assert cp.metric(compare(base, same), "peak_rss").verdict == cp.EQUIVALENT
    assert compare(base, same).exit_code == 0
    grown = cp.metric(compare(base, more), "peak_rss")
    assert grown.verdict == cp.REGRESSION and grown.note == cp.PEAKS_ONLY
