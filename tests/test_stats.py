"""Seed statistics: paired and unpaired intervals, rank agreement with bootstrap intervals, noise."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from archlab import stats


def test_a_paired_interval_is_the_t_interval_of_the_differences():
    a, b = [1.0, 2.0, 3.0, 4.0], [1.5, 2.4, 3.6, 4.5]
    c = stats.compare(a, b)
    d = np.subtract(b, a)
    half = sps.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert c.seeds == 4 and math.isclose(c.mean, d.mean())
    assert math.isclose(c.paired.low, d.mean() - half) and math.isclose(c.paired.high, d.mean() + half)
    assert c.paired.excludes_zero and not c.unpaired.excludes_zero  # seeds vary more than the designs differ
    assert c.correlation > 0.99 and c.pairing_gain > 5


def test_pairing_buys_nothing_when_scores_are_uncorrelated():
    rng = np.random.default_rng(0)
    gains = []
    for _ in range(200):
        a, b = rng.normal(0, 1, 5), rng.normal(0.0, 1, 5)
        gains.append(stats.compare(list(a), list(b)).pairing_gain)
    assert np.median(gains) < 1.05  # paired loses degrees of freedom and gains no variance


def test_failed_seeds_leave_the_paired_interval_and_few_seeds_give_none():
    c = stats.compare([1.0, None, 3.0, 2.0], [1.2, 2.0, 3.1, float("nan")])
    assert c.seeds == 2  # seeds 0 and 2 have both scores
    assert stats.compare([1.0], [2.0]).paired is None


def test_seeds_to_resolve_a_change_at_the_measured_noise():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 3)
    b = a + 0.5 + rng.normal(0, 0.3, 3)  # a real change of 0.5, paired noise ~0.3
    c = stats.compare(list(a), list(b))
    n = c.seeds_to_resolve(paired=True)
    assert n is not None and n >= 2
    # with that many seeds, the paired half-width at the measured noise is under the change; one fewer is not
    half = lambda k: sps.t.ppf(0.975, k - 1) * c.sd_paired / math.sqrt(k)  # noqa: E731
    assert half(n) < abs(c.mean) and (n == 2 or half(n - 1) >= abs(c.mean))
    assert c.seeds_to_resolve(paired=False) > n  # unpaired, the seed effect stays in the noise
    assert stats.compare([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]).seeds_to_resolve(paired=True) is None  # no change
    assert stats.compare([0.0, 1.0, 0.0], [0.001, 0.0, 1.0]).seeds_to_resolve(paired=True, cap=50) is None


def test_rank_agreement_with_bootstrap_intervals():
    x = list(range(10))
    same = stats.rank_agreement(x, [2 * v for v in x])
    assert same["kendall_tau"] == pytest.approx(1) and same["spearman_rho"] == pytest.approx(1)
    assert same["kendall_tau_ci"] == pytest.approx([1.0, 1.0])
    assert stats.rank_agreement(x, x[::-1])["kendall_tau"] == pytest.approx(-1)
    rng = np.random.default_rng(1)
    noisy = stats.rank_agreement(x, list(np.array(x) + rng.normal(0, 3, 10)))
    lo, hi = noisy["kendall_tau_ci"]
    assert lo < noisy["kendall_tau"] < hi and hi - lo > 0.1
    assert stats.rank_agreement([1, 2], [1, 2])["kendall_tau_ci"] is None  # too few designs for an interval


def test_noise_to_spread():
    rng = np.random.default_rng(2)
    means = np.linspace(0, 1, 8)
    quiet = stats.noise_to_spread([list(m + rng.normal(0, 0.01, 3)) for m in means])
    loud = stats.noise_to_spread([list(m + rng.normal(0, 3.0, 3)) for m in means])
    assert quiet["noise_to_spread"] < 0.1 < 1 < loud["noise_to_spread"]
    assert quiet["reliability"] > 0.99 > loud["reliability"]
    assert quiet["distinguishable"] > 8 > loud["distinguishable"] >= 1
    assert stats.noise_to_spread([[1.0], [2.0]])["noise"] is None  # one seed: no noise estimate
    # a seed effect common to every design (shared batches and noise) does not blur a ranking over the same seeds
    common = rng.normal(0, 1.0, 3)
    shifted = stats.noise_to_spread([list(m + common + rng.normal(0, 0.01, 3)) for m in means])
    assert shifted["noise"] > 0.5 and shifted["noise_paired"] < 0.05 and shifted["noise_to_spread"] < 0.1


def test_bootstrap_rank_correlations_match_scipy_row_by_row():
    """The bootstrap ranks thousands of resamples at once; each must be scipy's tau-b and rho (ties included)."""
    from scipy import stats as ss

    from archlab.stats import _rho, _tau_b

    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, (300, 7)).astype(float)  # many ties, some rows all tied
    y = rng.normal(size=(300, 7))
    y[:, 1] = y[:, 0]
    x[0] = 2.0
    taus, rhos = _tau_b(x, y), _rho(x, y)
    assert np.isnan(taus[0])
    for k in range(1, 300):
        assert taus[k] == pytest.approx(ss.kendalltau(x[k], y[k]).statistic, abs=1e-12)
        assert rhos[k] == pytest.approx(ss.spearmanr(x[k], y[k]).statistic, abs=1e-12)
