"""The quantile sketch: relative error against numpy's order statistics, merge, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traceml.views.sketch import QuantileSketch

QS = [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0]


def _exact(values: np.ndarray, q: float) -> float:
    """The order statistic the sketch answers for: rank floor(q * (n - 1))."""
    s = np.sort(values)
    return float(s[int(math.floor(q * (len(s) - 1)))])


def _close(got: float, want: float, accuracy: float) -> bool:
    return abs(got - want) <= accuracy * abs(want) + 1e-12


finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=300), st.sampled_from([0.01, 0.02, 0.05]))
def test_quantiles_within_relative_accuracy(values: list[float], accuracy: float) -> None:
    v = np.asarray(values)
    sk = QuantileSketch(accuracy)
    sk.add(v)
    for q in QS:
        want = _exact(v, q)
        got = sk.quantile(q)
        if abs(want) < 1e-9:  # magnitudes below MIN_MAGNITUDE count as zero
            assert abs(got) < 1e-9 or _close(got, want, accuracy)
        else:
            assert _close(got, want, accuracy), (q, got, want)
    assert sk.count == len(v)
    assert sk.min == v.min() and sk.max == v.max()
    assert math.isclose(sk.sum, float(v.sum()), rel_tol=1e-9, abs_tol=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(finite, max_size=100), min_size=1, max_size=6))
def test_merge_equals_one_sketch_of_everything(parts: list[list[float]]) -> None:
    whole = QuantileSketch()
    merged = QuantileSketch()
    for p in parts:
        whole.add(np.asarray(p))
        one = QuantileSketch()
        one.add(np.asarray(p))
        merged.merge(one)
    assert merged.count == whole.count
    assert np.array_equal(merged.quantiles(QS), whole.quantiles(QS), equal_nan=True)


def test_large_skewed_sample_median_and_p95_within_one_percent() -> None:
    rng = np.random.default_rng(7)
    v = np.concatenate([rng.lognormal(9.0, 0.3, 900_000), rng.lognormal(11.0, 0.5, 100_000)])
    sk = QuantileSketch()
    for chunk in np.array_split(v, 17):  # streamed in chunks
        sk.add(chunk)
    for q in (0.5, 0.95):
        assert _close(sk.quantile(q), _exact(v, q), 0.01)
        # and against numpy's interpolated quantile, on a dense sample
        assert _close(sk.quantile(q), float(np.quantile(v, q)), 0.0101)
    assert sk.buckets < 1000


def test_nan_and_infinite_values_are_not_counted_and_empty_is_nan() -> None:
    sk = QuantileSketch()
    assert math.isnan(sk.quantile(0.5)) and math.isnan(sk.mean)
    sk.add(np.array([np.nan, np.inf, -np.inf]))
    assert sk.count == 0
    sk.add(5.0)
    assert sk.quantile(0.5) == pytest.approx(5.0, rel=0.01)
    with pytest.raises(ValueError, match="accuracy"):
        QuantileSketch(0.0)
    with pytest.raises(ValueError, match="merge"):
        sk.merge(QuantileSketch(0.05))
