"""Does the lab's change from one ladder row to the next go the paper's way? One rule for cost,
latency and quality alike (`compare`), and the typed result of it (`Change`, `Verdict`).

The rule: both changes are relative to the row above; a change under UNCHANGED counts as none; where
the lab's change has a noise estimate (a score's interval over seeds, a measurement's run-to-run
variation, the predictor's error) and is within it, there is no verdict (NOISE); otherwise the
directions agree or disagree, and a disagreement carries the ladder's recorded reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Mapping

UNCHANGED = 0.005  # a relative change below 0.5% counts as "unchanged" when comparing directions


class Verdict(str, Enum):  # a str: JSON writes the value
    AGREE = "agree"
    DISAGREE = "disagree"
    NOISE = "noise"  # the lab's change is within its noise: no verdict
    NONE = "none"  # nothing to compare: the paper (or the lab) has no number

    @property
    def mark(self) -> str:
        return {"agree": "ok", "disagree": "DIFF", "noise": "~", "none": ""}[self.value]


@dataclass(frozen=True)
class Metric:
    label: str  # as reports show it
    paper: str | tuple[str, ...]  # the paper's number it compares with (a ladder `paper:` key; the first one
    # both rows have, where several)
    why: str  # the ladder `why_differs:` key that explains a disagreement


PARAMS = Metric("params", "params_m", "params")
MACS = Metric("MACs (paper: FLOPs)", "flops_g", "macs")  # the paper's FLOPs compare with our MACs
PREDICTED = Metric("predicted latency", "latency_ms", "latency")
# every quality score is compared with the paper's quality change (lower is better for all of them): its FID
# where it gives one (SnapGen), else its validation loss (SnapGen++ ablates by validation loss)
QUALITY = ("fid", "val_loss")
SCORES = {"fid": Metric("FID", QUALITY, "fid"), "kid": Metric("KID", QUALITY, "fid"),
          "val_loss": Metric("val loss", QUALITY, "fid")}


def measured(resolution: int | str) -> Metric:
    return Metric(f"measured latency {resolution}x{resolution}", "latency_ms", "latency")


@dataclass(frozen=True)
class Noise:
    """Whether the lab's change is outside its noise; `why` says what the noise is where it is not."""
    resolved: bool
    why: str = ""


@dataclass(frozen=True)
class ScoreTest(Noise):
    """A score's change over seeds: its mean, 95% interval and how it was made."""
    seeds: int = 0
    paired: bool = False
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    correlation: float | None = None
    pairing_gain: float | None = None
    seeds_to_resolve: int | None = None
    before: float | None = None  # the row above's mean score, which a relative change is a share of


@dataclass(frozen=True)
class Change:
    metric: str
    ours: float | None  # relative change from the row above
    paper: float | None
    verdict: Verdict
    reason: str = ""  # why there is no verdict (NOISE), or the ladder's reason (DISAGREE)
    test: Noise | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def relative(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or not before:
        return None
    return (after - before) / abs(before)  # abs: an unbiased KID can be negative


def direction(before: float, after: float) -> int:
    """-1, 0 or +1: the sign of a change, with changes under UNCHANGED (relative) counted as 0."""
    rel = (after - before) / abs(before) if before else after
    return 0 if abs(rel) < UNCHANGED else (1 if rel > 0 else -1)


def compare(metric: Metric, ours: tuple[float | None, float | None], paper: Mapping[str, float],
            paper_before: Mapping[str, float], why_differs: Mapping[str, str], noise: Noise | None = None) -> Change:
    """The lab's change `ours` = (row above, this row) against the paper's numbers of the two rows."""
    keys = (metric.paper,) if isinstance(metric.paper, str) else metric.paper
    key = next((k for k in keys if k in paper and k in paper_before), keys[0])
    pa, pb = paper_before.get(key), paper.get(key)
    rel_ours, rel_paper = relative(*ours), relative(pa, pb)
    if rel_ours is None or rel_paper is None:
        return Change(metric.label, rel_ours, rel_paper, Verdict.NONE, test=noise)
    if noise is not None and not noise.resolved:
        return Change(metric.label, rel_ours, rel_paper, Verdict.NOISE, noise.why, noise)
    if direction(*ours) == direction(pa, pb):
        return Change(metric.label, rel_ours, rel_paper, Verdict.AGREE, test=noise)
    reason = why_differs.get(metric.why, f"no reason recorded: add why_differs.{metric.why} to the ladder row")
    return Change(metric.label, rel_ours, rel_paper, Verdict.DISAGREE, reason, noise)


def tally(changes) -> dict[str, int]:
    """How many changes agree, disagree or are within noise."""
    verdicts = [c.verdict for c in changes]
    return {"agree": verdicts.count(Verdict.AGREE), "disagree": verdicts.count(Verdict.DISAGREE),
            "noise": verdicts.count(Verdict.NOISE)}
