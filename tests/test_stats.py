"""fpe_cli.stats against scipy (the oracle) and hand-computed cases."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from fpe_cli.stats import betainc, linear_fit, mean_se, paired_t_test

scipy_stats = pytest.importorskip("scipy.stats")
special = pytest.importorskip("scipy.special")


def test_mean_se_by_hand():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert se == pytest.approx(math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3 / 4))
    assert math.isnan(mean_se([1.0])[1])


@given(st.floats(0.05, 50), st.floats(0.05, 50), st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_betainc_matches_scipy(a, b, x):
    assert betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-9, abs=1e-12)


@given(st.lists(st.tuples(st.floats(-1, 1), st.floats(-1, 1)), min_size=2, max_size=20))
@settings(max_examples=100, deadline=None)
def test_paired_t_matches_scipy(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    diffs = [x - y for x, y in pairs]
    if max(diffs) - min(diffs) < 1e-9:
        return  # zero variance: scipy returns nan; ours is documented separately
    t, p = paired_t_test(a, b)
    ref = scipy_stats.ttest_rel(a, b)
    assert t == pytest.approx(float(ref.statistic), rel=1e-6, abs=1e-9)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-6, abs=1e-12)


def test_paired_t_zero_variance():
    assert paired_t_test([1.0, 2.0], [0.0, 1.0]) == (math.inf, 0.0)
    t, p = paired_t_test([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(t) and p == 1.0


@given(st.lists(st.tuples(st.floats(-10, 10), st.floats(-10, 10)), min_size=3, max_size=30))
@settings(max_examples=100, deadline=None)
def test_linear_fit_matches_scipy(points):
    x, y = [p[0] for p in points], [p[1] for p in points]
    fit = linear_fit(x, y)
    if math.isnan(fit["r"]) or max(x) - min(x) < 1e-6 or max(y) - min(y) < 1e-6 or abs(fit["r"]) > 1 - 1e-9:
        return  # degenerate or exactly collinear: p is 0 up to rounding in either implementation
    ref = scipy_stats.linregress(x, y)
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-6, abs=1e-9)
    assert fit["r"] == pytest.approx(ref.rvalue, rel=1e-6, abs=1e-9)
    assert fit["p"] == pytest.approx(ref.pvalue, rel=1e-5, abs=1e-10)
