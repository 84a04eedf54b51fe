"""The latency predictor: measured blocks, per-kind fits for the rest, whole-network calibration.

A prediction for a network is the sum of its blocks' latencies, then corrected by a calibration
fitted on whole networks measured end to end (it absorbs what block sums miss: the skip concats
between blocks, per-run overhead, fusions and cache effects). A block's latency is

- `measured`: its row in the table (drift-normalised median, `norm_ms`), when its signature was timed;
- `fitted`: otherwise, its kind's model, a non-negative linear model in the block's cost features
  (constant per-call overhead, MACs, weights, activation elements and, for transformers, attention
  score elements, RoPE and QK-norm work). Non-negative weights make it monotone: more work is never
  predicted faster. Fitted by NNLS on relative error; its leave-one-out error is kept per kind;
- `extrapolated`: the same model used outside the feature range it was fitted on (flagged);

and a block of a kind the table never measured, or with hyper-parameters the kind does not have,
is an error, never a zero. The predictor is saved as JSON (`<table>.predictor.json`): versioned,
readable, tied to the table by its SHA-256.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from archlab.config import Config, arch_from_dict
from archlab.decompose import BlockSpec, decompose, segments
from archlab.errors import ArchlabError
from archlab.kinds import KINDS, canonical
from archlab.io import write_atomic
from archlab.latency import table as tables

FORMAT = 1
TARGET = "norm_ms"  # the table column predicted: drift-normalised median


def predictor_path(table: str | Path) -> Path:
    return Path(table).with_suffix(".predictor.json")


def table_sha(table: str | Path) -> str:
    return hashlib.sha256(Path(table).read_bytes()).hexdigest()


# ---- features -----------------------------------------------------------------------------------

def features(spec: BlockSpec) -> dict[str, float]:
    """The cost features a kind model is linear in (units: M elements / M MACs / M params)."""
    from archlab.cost import block_cost

    c = block_cost(spec)
    f = {"call": 1.0, "macs": c.macs / 1e6, "params": c.params / 1e6, "acts": c.acts / 1e6}
    kind = KINDS.get(spec.kind)
    if kind is not None and kind.features is not None:  # the kind's own (archlab.kinds)
        f.update(kind.features(spec.params(), spec.hw))
    return f


@dataclass
class KindModel:
    kind: str
    hp_names: tuple[str, ...]  # the hyper-parameters every block of this kind has
    features: tuple[str, ...]
    coef: tuple[float, ...]  # ms per unit of each feature, all >= 0
    low: tuple[float, ...]  # feature range seen in fitting
    high: tuple[float, ...]
    n: int
    loo_mape: float | None  # leave-one-out mean absolute percentage error on the fitted rows

    def predict(self, f: dict[str, float]) -> tuple[float, bool]:
        """(ms, extrapolated) for a feature dict."""
        x = [f.get(name, 0.0) for name in self.features]
        outside = any(v < lo * (1 - 1e-9) or v > hi * (1 + 1e-9) for v, lo, hi in zip(x, self.low, self.high))
        return float(np.dot(self.coef, x)), outside


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error: min sum(((x b - y) / y)^2), b >= 0."""
    from scipy.optimize import nnls

    a = x / y[:, None]
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    b, _ = nnls(a / scale, np.ones_like(y), maxiter=50 * x.shape[1])
    return b / scale


def _loo_mape(fit_fn, x: np.ndarray, y: np.ndarray, min_rows: int) -> float | None:
    """Leave-one-out mean absolute percentage error of `fit_fn(x, y) -> coef` with prediction x @ coef."""
    if len(y) < min_rows:
        return None
    errs = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        errs.append(abs(x[i] @ fit_fn(x[keep], y[keep]) / y[i] - 1))
    return float(np.mean(errs))


def fit_kind(kind: str, specs: Sequence[BlockSpec], ms: Sequence[float]) -> KindModel:
    hp_names = tuple(k for k, _ in specs[0].hp)
    feats = []
    for s in specs:
        if tuple(k for k, _ in s.hp) != hp_names:
            raise ArchlabError(f"{s.key}: its hyper-parameters differ from other {kind} rows ({', '.join(hp_names)})")
        try:
            feats.append(features(s))
        except Exception as e:  # a row whose block cannot be built
            raise ArchlabError(f"{s.key}: cannot be built to compute its features: {e}") from None
    names = tuple(sorted({k for f in feats for k in f}, key=list(feats[0]).index))
    x = np.array([[f.get(k, 0.0) for k in names] for f in feats])
    y = np.asarray(ms, dtype=float)
    coef = _nnls_relative(x, y)
    return KindModel(kind, hp_names, names, tuple(map(float, coef)), tuple(map(float, x.min(0))),
                     tuple(map(float, x.max(0))), len(y), _loo_mape(_nnls_relative, x, y, 3))


# ---- calibration --------------------------------------------------------------------------------

@dataclass
class Calibration:
    """measured network = intercept_ms + slope * (sum of its blocks)."""
    intercept_ms: float = 0.0
    slope: float = 1.0
    n: int = 0
    networks: tuple[str, ...] = ()  # keys of the networks it was fitted on
    digests: tuple[str, ...] = ()  # their architecture digests (held-out sets must avoid them)
    loo_mape: float | None = None
    raw_mape: float | None = None  # the uncalibrated block sum's error on the same networks
    raw_range: tuple[float, float] = (0.0, math.inf)  # block sums of the networks it was fitted on

    def apply(self, raw_ms: float | np.ndarray):
        return self.intercept_ms + self.slope * raw_ms

    def covers(self, raw_ms: float) -> bool:
        """Within the fitted range (with 25% slack): outside it, the line is extrapolated."""
        return self.raw_range[0] / 1.25 <= raw_ms <= self.raw_range[1] * 1.25


MIN_LINE = 4  # fewer calibration networks than this: a pure ratio, not a line


def _fit_line(x: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """(intercept, slope) minimising relative error; x is the [1, raw] design matrix."""
    if len(measured) < MIN_LINE:
        return np.array([0.0, float(np.mean(measured / x[:, 1]))])
    coef, *_ = np.linalg.lstsq(x / measured[:, None], np.ones_like(measured), rcond=None)
    return coef


def fit_calibration(keys: Sequence[str], digests: Sequence[str], raw: Sequence[float],
                    measured: Sequence[float]) -> Calibration:
    raw_a, meas = np.asarray(raw, float), np.asarray(measured, float)
    x = np.stack([np.ones_like(raw_a), raw_a], axis=1)
    c0, c1 = _fit_line(x, meas)
    raw_mape = float(np.mean(np.abs(raw_a / meas - 1)))
    return Calibration(float(c0), float(c1), len(raw_a), tuple(keys), tuple(digests),
                       _loo_mape(_fit_line, x, meas, MIN_LINE + 1), raw_mape, (float(raw_a.min()), float(raw_a.max())))


# ---- the predictor ------------------------------------------------------------------------------

@dataclass
class BlockLatency:
    name: str
    key: str
    kind: str
    ms: float
    source: str  # measured | fitted | extrapolated


@dataclass
class Prediction:
    name: str
    latency_ms: float  # calibrated (equal to raw_sum_ms when the predictor has no calibration)
    raw_sum_ms: float
    blocks: list[BlockLatency]
    outside_calibration: bool = False  # the block sum lies outside what the calibration was fitted on

    @property
    def extrapolated(self) -> bool:
        return self.outside_calibration or any(b.source == "extrapolated" for b in self.blocks)

    def to_dict(self, with_blocks: bool = True) -> dict:
        d = {"name": self.name, "latency_ms": round(self.latency_ms, 4), "raw_sum_ms": round(self.raw_sum_ms, 4),
             "extrapolated": self.extrapolated, "outside_calibration": self.outside_calibration,
             "sources": {s: sum(b.source == s for b in self.blocks) for s in ("measured", "fitted", "extrapolated")}}
        if with_blocks:
            d["blocks"] = [{"name": b.name, "key": b.key, "kind": b.kind, "latency_ms": round(b.ms, 5),
                            "source": b.source} for b in self.blocks]
        return d


@dataclass
class Predictor:
    settings: dict  # the table's metadata: device, cpu, resolution, threads, opt_level, ort_version, ...
    measured: dict[str, float]  # block key -> ms
    kinds: dict[str, KindModel]
    calibration: Calibration | None = None
    table: str = ""
    table_sha256: str = ""
    _memo: dict = field(default_factory=dict, repr=False, compare=False)
    _segments: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def resolution(self) -> int:
        return int(self.settings["resolution"])

    # -- blocks --
    def block(self, spec: BlockSpec) -> tuple[float, str]:
        """(ms, source) of one block; raises ArchlabError if the predictor cannot cover it."""
        hit = self._memo.get(spec)
        if hit is not None:
            return hit
        model = self.kinds.get(spec.kind)
        hp = canonical(spec.kind, spec.hp)  # a block written with its hyper-parameters in another order
        if hp != spec.hp:
            spec = BlockSpec(spec.kind, hp, spec.hw)
        names = tuple(k for k, _ in spec.hp)
        key = spec.key
        if key in self.measured:
            out = (self.measured[key], "measured")
        else:
            if model is None:
                raise ArchlabError(f"block {key}: the table has no {spec.kind!r} blocks (it has "
                                   f"{', '.join(sorted(self.kinds))}); measure this kind first")
            if set(names) != set(model.hp_names):
                missing, extra = set(model.hp_names) - set(names), set(names) - set(model.hp_names)
                what = "; ".join(filter(None, [missing and f"missing {', '.join(sorted(missing))}",
                                               extra and f"unknown {', '.join(sorted(extra))}"]))
                raise ArchlabError(f"block {key}: {what} (a {spec.kind} block has {', '.join(model.hp_names)})")
            try:
                f = features(spec)
            except Exception as e:  # a block that cannot be built (bad channels for its groups, ...)
                raise ArchlabError(f"block {key}: cannot be built: {e}") from None
            ms, outside = model.predict(f)
            out = (ms, "extrapolated" if outside else "fitted")
        self._memo[spec] = out
        return out

    # -- networks --
    def _check(self, cfg: Config) -> None:
        if cfg.latent.resolution != self.resolution:
            raise ArchlabError(f"{cfg.name}: latent {cfg.latent.resolution}x{cfg.latent.resolution}, but the table "
                               f"was measured at {self.resolution}x{self.resolution}: query it at the table's "
                               f"resolution (--resolution {self.resolution}) or measure a table at yours")

    def predict(self, cfg: Config) -> Prediction:
        self._check(cfg)
        blocks = []
        for s in decompose(cfg):
            ms, source = self.block(s)
            blocks.append(BlockLatency(s.name, s.key, s.kind, ms, source))
        raw = sum(b.ms for b in blocks)
        return Prediction(cfg.name, float(self.calibrate(raw, cfg.name)), raw, blocks,
                          self.calibration is not None and not self.calibration.covers(raw))

    def predict_many(self, cfgs: Iterable[Config]) -> np.ndarray:
        """Calibrated ms for many networks: the search's fast path. The blocks' latencies are memoised
        per decomposition segment (a stage's down path, ...), which `segments` returns as the same object
        for the same inputs; the sum runs over the blocks in forward order, as `predict` does, so both
        give the same number to the last bit."""
        out = []
        for cfg in cfgs:
            self._check(cfg)
            raw = sum(itertools.chain.from_iterable(self._segment_ms(seg) for seg in segments(cfg)))
            out.append(self.calibrate(raw, cfg.name))
        return np.asarray(out, dtype=float)

    def _segment_ms(self, seg: tuple[BlockSpec, ...]) -> tuple[float, ...]:
        hit = self._segments.get(id(seg))
        if hit is None:  # keeps `seg` alive with its latencies, so its id is never another segment's
            hit = self._segments[id(seg)] = (seg, tuple(self.block(s)[0] for s in seg))
        return hit[1]

    def calibrate(self, raw_ms: float, name: str = "") -> float:
        if self.calibration is None:
            return raw_ms
        ms = self.calibration.apply(raw_ms)
        if ms <= 0:
            raise ArchlabError(f"{name}: the calibration gives {ms:.3f} ms for a block sum of {raw_ms:.3f} ms, far "
                               f"outside the {self.calibration.raw_range[0]:.0f}-{self.calibration.raw_range[1]:.0f} ms "
                               "it was fitted on; calibrate on networks of this size")
        return ms

    # -- persistence --
    def to_dict(self) -> dict:
        cal = self.calibration
        return {
            "format": FORMAT,
            "what": "archlab latency predictor: measured block latencies, per-kind NNLS models, calibration",
            "table": self.table, "table_sha256": self.table_sha256, "target": TARGET,
            "settings": self.settings,
            "calibration": None if cal is None else {
                "formula": "latency_ms = intercept_ms + slope * sum(block latency_ms)",
                "intercept_ms": cal.intercept_ms, "slope": cal.slope, "n": cal.n, "loo_mape": cal.loo_mape,
                "raw_mape": cal.raw_mape, "raw_range_ms": list(cal.raw_range), "networks": list(cal.networks),
                "digests": list(cal.digests)},
            "kinds": {k: {"hp_names": list(m.hp_names), "n": m.n, "loo_mape": m.loo_mape,
                          "features": {f: {"coef_ms": c, "low": lo, "high": hi}
                                       for f, c, lo, hi in zip(m.features, m.coef, m.low, m.high)}}
                      for k, m in sorted(self.kinds.items())},
            "measured_ms": dict(sorted(self.measured.items())),
        }

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Predictor":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise ArchlabError(f"{path}: predictor format {d.get('format')!r}, this archlab reads {FORMAT}")
            kinds = {}
            for k, m in d["kinds"].items():
                f = m["features"]
                kinds[k] = KindModel(k, tuple(m["hp_names"]), tuple(f), tuple(float(v["coef_ms"]) for v in f.values()),
                                     tuple(float(v["low"]) for v in f.values()),
                                     tuple(float(v["high"]) for v in f.values()), int(m["n"]), m["loo_mape"])
            c = d["calibration"]
            cal = None if c is None else Calibration(
                float(c["intercept_ms"]), float(c["slope"]), int(c["n"]), tuple(c["networks"]), tuple(c["digests"]),
                c["loo_mape"], c["raw_mape"], tuple(float(v) for v in c["raw_range_ms"]))
            return cls(tables.upgrade(d["settings"]), {k: float(v) for k, v in d["measured_ms"].items()}, kinds, cal,
                       d["table"], d["table_sha256"])
        except ArchlabError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise ArchlabError(f"{path}: not a readable archlab predictor ({type(e).__name__}: {e})") from None


# ---- tables -------------------------------------------------------------------------------------

def read_checked_table(table: str | Path, device: str | None = None, resolution: int | None = None) -> tuple[dict, list[dict]]:
    """A table's (metadata, rows), checked: columns, numbers, and the device/resolution asked for."""
    table = Path(table)
    if not table.is_file():
        raise ArchlabError(f"{table}: no such latency table")
    try:
        meta, rows = tables.read_table(table)
    except tables.RunnerError as e:
        raise ArchlabError(str(e)) from None
    for key in (*tables.SETTINGS, "reference_ms"):
        if key not in meta:
            raise ArchlabError(f"{table.with_suffix('.meta.json')}: metadata has no {key!r}")
    if not isinstance(meta["resolution"], int) or not isinstance(meta["threads"], int):
        raise ArchlabError(f"{table.with_suffix('.meta.json')}: resolution and threads must be integers")
    if device is not None and meta["device"] != device:
        raise ArchlabError(f"{table}: measured on device {meta['device']!r}, not {device!r}")
    if resolution is not None and meta["resolution"] != resolution:
        raise ArchlabError(f"{table}: measured at latent {meta['resolution']}, not {resolution}")
    seen: set[str] = set()
    for i, r in enumerate(rows, start=2):
        if r["key"] in seen:
            raise ArchlabError(f"{table}:{i}: key {r['key']} appears twice")
        seen.add(r["key"])
        for col in ("median_ms", TARGET, "ref_ms", "cv"):
            try:
                v = float(r[col])
            except (TypeError, ValueError):
                raise ArchlabError(f"{table}:{i}: {col}={r[col]!r} is not a number") from None
            if not math.isfinite(v) or v < 0 or (col != "cv" and v == 0):
                raise ArchlabError(f"{table}:{i}: {col}={r[col]!r} is not a positive finite number")
        if r["role"] not in ("block", "reference", "network"):
            raise ArchlabError(f"{table}:{i}: role={r['role']!r} is not block, reference or network")
    if not rows:
        raise ArchlabError(f"{table}: has no rows")
    return meta, rows


def fit(table: str | Path, progress=None) -> Predictor:
    """Fit a predictor on a measured table: block rows -> kind models, network rows -> calibration."""
    table = Path(table)
    meta, rows = read_checked_table(table)
    by_kind: dict[str, list[tuple[BlockSpec, float]]] = {}
    measured: dict[str, float] = {}
    for i, r in enumerate(rows, start=2):
        if r["role"] == "network":
            continue
        try:
            spec = BlockSpec.from_key(r["key"])
        except ValueError as e:
            raise ArchlabError(f"{table}:{i}: key: {e}") from None
        if spec.kind != r["kind"]:
            raise ArchlabError(f"{table}:{i}: kind={r['kind']!r} but the key says {spec.kind!r}")
        measured[r["key"]] = float(r[TARGET])  # blocks and the reference (also a block)
        by_kind.setdefault(spec.kind, []).append((spec, float(r[TARGET])))
    kinds = {}
    items = sorted(by_kind.items())
    for kind, pairs in (progress(items) if progress else items):
        specs, ms = zip(*pairs)
        kinds[kind] = fit_kind(kind, specs, ms)
    pred = Predictor({k: v for k, v in meta.items() if k != "networks"}, measured, kinds,
                     table=str(table), table_sha256=table_sha(table))
    nets = [r for r in rows if r["role"] == "network"]
    if nets:
        configs = meta.get("networks", {})
        missing = [r["key"] for r in nets if r["key"] not in configs]
        if missing:
            raise ArchlabError(f"{table}: network row {missing[0]} has no config in the metadata, so it cannot calibrate")
        cfgs = [arch_from_dict(configs[r["key"]], f"{table}: {r['key']}") for r in nets]
        raw = [pred.predict(c).raw_sum_ms for c in cfgs]
        pred.calibration = fit_calibration([r["key"] for r in nets], [c.digest() for c in cfgs], raw,
                                           [float(r[TARGET]) for r in nets])
    return pred


def load_for_table(table: str | Path, device: str | None = None) -> Predictor:
    """The saved predictor of a table, checked to be fitted on that very table (and device)."""
    table = Path(table)
    read_checked_table(table, device=device)
    path = predictor_path(table)
    if not path.is_file():
        raise ArchlabError(f"{table}: no fitted predictor ({path.name}): run `archlab latency fit {table}`")
    pred = Predictor.load(path)
    if pred.table_sha256 != table_sha(table):
        raise ArchlabError(f"{path}: fitted on another version of {table.name}: run `archlab latency fit {table}` again")
    return pred
