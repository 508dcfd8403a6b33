"""Study statistics against independent computations: log-L0 interpolation (and its refusal to extrapolate),
seed summaries, bootstrap intervals (vs exact enumeration), the difference test (vs scipy's Welch test),
gap closed, the smallest budget and the per-document jackknife."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from domain_sae.analysis.stats import (ExtrapolationError, Frontier, bootstrap_ci, common_l0_range, difference_test,
                                       gap_closed, gap_closed_interval, interpolate_at_l0, jackknife_ratio_se,
                                       l0_grid, matched_values, seed_summary, smallest_budget)


def test_interpolation_is_linear_in_log_l0():
    l0s = [80.0, 10.0, 40.0, 20.0]                       # unsorted on purpose
    values = [0.9 - 0.05 * math.log(x) + (0.01 if x == 40 else 0) for x in l0s]
    rng = np.random.default_rng(1)
    for t in rng.uniform(10, 80, size=50):
        v, se = interpolate_at_l0(l0s, values, t)
        order = np.argsort(l0s)
        expected = np.interp(math.log(t), np.log(np.array(l0s)[order]), np.array(values)[order])
        assert v == pytest.approx(expected, abs=1e-12)
        assert math.isnan(se)
    # at the points themselves the frontier returns the measured values
    for x, y in zip(l0s, values):
        assert interpolate_at_l0(l0s, values, x)[0] == pytest.approx(y)


def test_interpolation_standard_error_matches_simulation():
    l0s, values, ses = [10.0, 40.0], [0.7, 0.8], [0.02, 0.05]
    t = 20.0                                             # w = ln 2 / ln 4 = 0.5
    v, se = interpolate_at_l0(l0s, values, t, ses)
    assert v == pytest.approx(0.75)
    assert se == pytest.approx(0.5 * math.sqrt(0.02 ** 2 + 0.05 ** 2))
    rng = np.random.default_rng(0)
    sims = [interpolate_at_l0(l0s, [0.7 + rng.normal(0, 0.02), 0.8 + rng.normal(0, 0.05)], t)[0]
            for _ in range(5000)]
    assert np.std(sims) == pytest.approx(se, rel=0.05)


def test_refuses_extrapolation_and_averages_duplicates():
    f = Frontier.from_points([10, 20, 20, 40], [0.6, 0.7, 0.8, 0.9], [0.1, 0.1, 0.1, 0.1], name="chat scratch")
    assert f.l0 == (10.0, 20.0, 40.0) and f.value[1] == pytest.approx(0.75)
    assert f.se[1] == pytest.approx(math.sqrt(0.02) / 2)
    for t in (9.99, 40.01):
        with pytest.raises(ExtrapolationError, match=r"\[10, 40\] covered by chat scratch.*does not extrapolate"):
            f.at(t)
    assert f.at(10)[0] == pytest.approx(0.6) and f.at(40)[0] == pytest.approx(0.9)
    with pytest.raises(Exception, match="positive"):
        Frontier.from_points([0, 10], [0.1, 0.2])


def test_common_range_grid_and_matched_values():
    a = Frontier.from_points([5, 50], [0.5, 0.9], name="a")
    b = Frontier.from_points([10, 100], [0.4, 0.8], name="b")
    assert common_l0_range([a, b]) == (10, 50)
    grid = l0_grid(10, 50, 3)
    assert grid == pytest.approx([10, math.sqrt(500), 50])
    vals, _ = matched_values([a, b], 20)
    assert vals == pytest.approx([0.5 + 0.4 * math.log(4) / math.log(10), 0.4 + 0.4 * math.log(2) / math.log(10)])
    with pytest.raises(ExtrapolationError, match="share no L0 range"):
        common_l0_range([a, Frontier.from_points([60, 70], [0.1, 0.2], name="c")])


def test_seed_summary():
    s = seed_summary([0.81, 0.83, 0.86])
    assert s.mean == pytest.approx(statistics.mean([0.81, 0.83, 0.86]))
    assert s.std == pytest.approx(statistics.stdev([0.81, 0.83, 0.86]))
    assert s.sem == pytest.approx(s.std / math.sqrt(3)) and s.n == 3
    assert seed_summary([0.5]).std == 0.0
    assert "±" in s.format()


def test_bootstrap_interval_matches_exact_enumeration():
    x = np.array([0.0, 1.0, 3.0, 7.0])
    exact = np.array(sorted(x[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)))  # 256 resamples
    lo, hi = bootstrap_ci(x, n_boot=100_000, level=0.9, seed=3)
    # the bootstrap quantiles fall between neighbouring atoms of the exact resampling distribution
    step = 0.25
    assert abs(lo - np.quantile(exact, 0.05)) <= step and abs(hi - np.quantile(exact, 0.95)) <= step
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)          # reproducible
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_difference_test_reduces_to_welch():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.80, 0.01, 5), rng.normal(0.78, 0.02, 4)
    res = difference_test(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert res.diff / res.se == pytest.approx(ref.statistic)
    assert res.df == pytest.approx(ref.df)
    spread = max(np.std(a, ddof=1), np.std(b, ddof=1))
    assert res.is_difference == (ref.pvalue < 0.05 and abs(res.diff) > spread)


def test_difference_test_adds_document_errors_and_seed_spread_rule():
    a, b = [0.80, 0.81, 0.82], [0.70, 0.71, 0.72]
    plain = difference_test(a, b)
    with_doc = difference_test(a, b, doc_se_a=[0.02, 0.02, 0.02], doc_se_b=0.01)
    assert with_doc.se == pytest.approx(math.sqrt(0.01 ** 2 / 3 * 2 + 0.02 ** 2 + 0.01 ** 2))
    assert plain.is_difference and with_doc.is_difference
    assert not difference_test(a, b, doc_se_diff=0.06).is_difference   # evaluation noise swamps 0.1
    # many seeds: Welch says significant, but the difference is smaller than the seed-to-seed spread
    x = np.array([0.0, 1.0] * 50)
    res = difference_test(x + 0.3, x)
    assert sps.ttest_ind(x + 0.3, x, equal_var=False).pvalue < 0.05
    assert not res.is_difference and res.threshold == pytest.approx(np.std(x, ddof=1))
    assert not difference_test([0.8], [0.7, 0.71]).is_difference       # one seed is never enough


def test_gap_closed_point_and_interval():
    assert gap_closed(0.7, 0.8, 0.775) == pytest.approx(0.75)
    assert math.isnan(gap_closed(0.7, 0.7, 0.75))
    g, s, c = [0.70, 0.71], [0.80, 0.82], [0.76, 0.78]
    res = gap_closed_interval(g, s, c, n_boot=50_000, level=0.9)
    assert res.defined
    assert res.fraction == pytest.approx((0.77 - 0.705) / (0.81 - 0.705))
    # exact distribution over all 4 x 4 x 4 equally likely resamples of two seeds per condition
    exact = []
    for gi, si, ci in itertools.product(itertools.product(range(2), repeat=2), repeat=3):
        gm, sm, cm = (np.mean(np.array(v)[list(i)]) for v, i in ((g, gi), (s, si), (c, ci)))
        exact.append((cm - gm) / (sm - gm))
    exact = np.sort(exact)
    assert res.low == pytest.approx(np.quantile(exact, 0.05), abs=0.06)
    assert res.high == pytest.approx(np.quantile(exact, 0.95), abs=0.06)
    flat = gap_closed_interval([0.70, 0.7001, 0.70], [0.7001, 0.70, 0.7002], [0.8, 0.8, 0.8])
    assert not flat.defined and "undefined" in flat.format()


def test_smallest_budget():
    budgets = [1e4, 1e5, 1e6]
    r = smallest_budget(budgets, [0.2, 0.4, 0.95], 0.5)
    # crossing at w = (0.5 - 0.4) / 0.55 of the way from 1e5 to 1e6 in log space
    assert r.status == "reached" and r.budget == pytest.approx(10 ** (5 + 0.1 / 0.55))
    assert smallest_budget(budgets, [0.6, 0.7, 0.8], 0.5).status == "at_or_below_first"
    none = smallest_budget(budgets, [0.1, 0.3, 0.85], 0.9)
    assert none.status == "not_reached" and none.budget is None and "none" in none.format()
    with pytest.raises(ValueError):
        smallest_budget([1e5, 1e4], [0.1, 0.2], 0.5)


def test_jackknife_ratio_se_brute_force():
    rng = np.random.default_rng(2)
    num, den = rng.uniform(1, 5, 12), rng.uniform(10, 20, 12)
    thetas = [(num.sum() - num[i]) / (den.sum() - den[i]) for i in range(12)]
    mean = sum(thetas) / 12
    expected = math.sqrt(11 / 12 * sum((t - mean) ** 2 for t in thetas))
    assert jackknife_ratio_se(num, den) == pytest.approx(expected)
    # for a plain mean (den = 1 each) the jackknife se is the usual std / sqrt(n)
    x = rng.normal(size=30)
    assert jackknife_ratio_se(x, np.ones(30)) == pytest.approx(np.std(x, ddof=1) / math.sqrt(30))
    assert math.isnan(jackknife_ratio_se([1.0], [2.0]))
