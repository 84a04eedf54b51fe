"""Statistics for quality scores measured over training seeds: is a difference outside its noise?

- `compare(a, b)`: the change from design A to design B of a score measured with seeds 0..K-1 on
  both. Two 95% intervals on the mean change: *paired* (the t interval of the per-seed differences
  b_k - a_k; seed k shares data order, timesteps, noise and the initial weights of the blocks the two
  designs have in common) and *unpaired* (Welch). Pairing helps exactly when the two designs' scores
  are correlated over seeds; `Comparison.pairing_gain` is how much narrower the paired interval is.
- `rank_agreement(x, y)`: Kendall tau and Spearman rho between two rankings of the same designs,
  with a bootstrap interval over designs (resampled with replacement).
- `noise_to_spread(scores)`: the seed-to-seed noise of a score that a ranking over shared seeds sees
  (the design x seed interaction) against the spread of the designs' true means: under 1, designs
  differ by more than a seed does; `distinguishable` counts how many designs the score can tell apart
  across its range at K seeds.

Only numpy and scipy; every function takes plain lists and returns plain numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
MIN_SEEDS = 3  # fewer seeds than this give no verdict: a 2-seed interval rests on one degree of freedom


def _t(df: float, level: float = LEVEL) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class Comparison:
    """Change from A to B (B - A) over the seeds both have."""
    seeds: int
    mean: float
    paired: Interval | None  # None with fewer than 2 seeds
    unpaired: Interval | None
    correlation: float | None  # of A's and B's scores over seeds
    sd_paired: float | None = None  # seed-to-seed std of the per-seed difference b_k - a_k
    sd_unpaired: float | None = None  # sqrt(var_a + var_b): the std of the difference of two independent seeds

    @property
    def pairing_gain(self) -> float | None:
        """Unpaired interval width / paired width: > 1 where pairing by seed narrows the interval."""
        if self.paired is None or self.unpaired is None:
            return None
        if self.paired.half_width == 0:
            return math.inf if self.unpaired.half_width > 0 else None
        return self.unpaired.half_width / self.paired.half_width

    def interval(self, paired: bool) -> Interval | None:
        return self.paired if paired else self.unpaired

    def seeds_to_resolve(self, paired: bool, level: float = LEVEL, cap: int = 200) -> int | None:
        """About how many seeds per design would put a change this large outside its interval, were the
        change and the seed noise what these seeds measured (a planning figure: the measured change is
        itself uncertain). None: no noise estimate, or more than `cap` seeds."""
        sd = self.sd_paired if paired else self.sd_unpaired
        if sd is None or not math.isfinite(self.mean):
            return None
        if sd == 0:
            return 2 if self.mean else None
        for n in range(2, cap + 1):
            if _t((n - 1) if paired else (2 * n - 2), level) * sd / math.sqrt(n) < abs(self.mean):
                return n
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairing_gain"] = self.pairing_gain
        return d


def _finite(values) -> list[float | None]:
    return [v if v is not None and math.isfinite(v) else None for v in values]


def compare(a: list[float | None], b: list[float | None], level: float = LEVEL) -> Comparison:
    """B - A, seed by seed. `a[k]` and `b[k]` are the scores of seed k (None: that run failed; its
    seed is left out of the paired interval, and the unpaired one uses every finite score)."""
    a, b = _finite(a), _finite(b)
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    xa = np.array([v for v in a if v is not None])
    xb = np.array([v for v in b if v is not None])
    if not pairs:
        return Comparison(0, math.nan, None, None, None)
    d = np.array([y - x for x, y in pairs])
    k = len(d)
    mean = float(xb.mean() - xa.mean()) if len(xa) and len(xb) else float(d.mean())
    paired = unpaired = corr = sd_p = sd_u = None
    if k >= 2:
        sd_p = float(d.std(ddof=1))
        half = _t(k - 1, level) * sd_p / math.sqrt(k)
        paired = Interval(float(d.mean()), float(d.mean() - half), float(d.mean() + half))
        pa, pb = np.array(pairs).T
        if pa.std() > 0 and pb.std() > 0:
            corr = float(np.corrcoef(pa, pb)[0, 1])
    if len(xa) >= 2 and len(xb) >= 2:
        sd_u = float(math.sqrt(xa.var(ddof=1) + xb.var(ddof=1)))
        va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / ((va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1)) or math.inf) if se else len(xa) + len(xb) - 2
        half = _t(df, level) * se
        unpaired = Interval(mean, mean - half, mean + half)
    return Comparison(k, float(d.mean()) if paired else mean, paired, unpaired, corr, sd_p, sd_u)


def _ranks_something(x, y) -> bool:
    """Both have two or more distinct values (np.std of equal floats can come out 1e-12, not 0)."""
    return len(x) >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0


def kendall(x, y) -> float | None:
    """Kendall's tau-b; None where either side is one value repeated (no ranking to compare)."""
    from scipy import stats

    return float(stats.kendalltau(x, y).statistic) if _ranks_something(x, y) else None


def spearman(x, y) -> float | None:
    """Spearman's rho; None where either side is one value repeated."""
    from scipy import stats

    return float(stats.spearmanr(x, y).statistic) if _ranks_something(x, y) else None


def _tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row of x against the same row of y (scipy's `kendalltau`, all rows at once;
    nan where a row is all ties)."""
    a, b = np.triu_indices(x.shape[1], 1)
    dx, dy = np.sign(x[:, a] - x[:, b]), np.sign(y[:, a] - y[:, b])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (dx * dy).sum(1) / np.sqrt((dx != 0).sum(1) * (dy != 0).sum(1))


def _rho(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of x against the same row of y (average ranks for ties)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))


def rank_agreement(x, y, boot: int = 2000, seed: int = 0, level: float = LEVEL) -> dict:
    """Kendall tau and Spearman rho of x against y (one value per design, same order), with
    percentile bootstrap intervals over designs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    out = {"n": n, "kendall_tau": kendall(x, y), "spearman_rho": spearman(x, y),
           "kendall_tau_ci": None, "spearman_rho_ci": None}
    if n < 4 or out["kendall_tau"] is None:
        return out
    rng = np.random.default_rng(seed)
    draws = [i for i in (rng.integers(0, n, n) for _ in range(boot)) if len(set(i)) >= 3]
    taus, rhos = _tau_b(x[draws], y[draws]), _rho(x[draws], y[draws])
    ok = ~np.isnan(taus)  # a resample with every x (or y) tied has no rank correlation
    taus, rhos = taus[ok], rhos[ok]
    q = [100 * (0.5 - level / 2), 100 * (0.5 + level / 2)]
    out["kendall_tau_ci"] = [float(v) for v in np.percentile(taus, q)]
    out["spearman_rho_ci"] = [float(v) for v in np.percentile(rhos, q)]
    return out


def noise_to_spread(scores: list[list[float | None]], level: float = LEVEL) -> dict:
    """`scores[i][k]`: design i's score with seed k (every design trained with the same seeds).

    - noise: the seed-to-seed std of one design's score, pooled over designs;
    - noise_paired: what is left of it once the seed's effect common to every design is removed (the
      design x seed interaction of a two-way layout, over the designs that have every seed). Seed k
      gives every design the same batches, noise and shared initial weights, so a seed that is lucky
      for one design is lucky for most: that common part shifts every mean alike and does not change a
      ranking of means over the same seeds. This is the noise such a ranking sees;
    - spread: the std of the designs' true means, sqrt(var(means) - noise_paired^2 / K) (the spread of
      K-seed means less what seed noise alone puts there; 0 when noise explains it all);
    - noise_to_spread: noise_paired / spread (under 1: designs differ by more than a seed does; None
      when seed noise explains all of the spread, reliability 0: the ranking is noise);
    - reliability: the share of the K-seed means' variance that is real design differences;
    - distinguishable: 1 + (range of the means) / (the smallest difference of two K-seed means outside
      the noise at the 95% level, t x noise_paired x sqrt(2/K)): roughly how many designs the score can
      put in a sure order."""
    rows = [_finite(s) for s in scores]
    groups = [[v for v in r if v is not None] for r in rows]
    out = {"noise": None, "noise_paired": None, "spread": None, "noise_to_spread": None, "reliability": None,
           "distinguishable": None, "seeds": float(np.mean([len(g) for g in groups if g])) if any(groups) else None}
    multi = [g for g in groups if len(g) >= 2]
    if multi:
        dof = sum(len(g) - 1 for g in multi)
        out["noise"] = math.sqrt(sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in multi) / dof)
    width = min((len(r) for r in rows), default=0)
    seeds = [k for k in range(width) if all(r[k] is not None for r in rows)]
    full = np.array([[r[k] for k in seeds] for r in rows]) if len(seeds) >= 2 and len(rows) >= 2 else None
    if full is None:
        return out
    n, k = full.shape
    resid = full - full.mean(1, keepdims=True) - full.mean(0, keepdims=True) + full.mean()
    noise = math.sqrt((resid ** 2).sum() / ((n - 1) * (k - 1)))
    means = full.mean(1)
    var_means = float(means.var(ddof=1))
    true_var = max(var_means - noise ** 2 / k, 0.0)
    detectable = _t((n - 1) * (k - 1), level) * noise * math.sqrt(2 / k)
    out.update(noise_paired=noise, spread=math.sqrt(true_var), seeds=float(k),
               noise_to_spread=noise / math.sqrt(true_var) if true_var else None,
               reliability=true_var / var_means if var_means else None,
               distinguishable=1 + float(means.max() - means.min()) / detectable if detectable else None)
    return out
