"""`archlab report RUN_DIR [--name NAME]`: the ablation ladder, the paper's numbers beside the lab's.

Reads only what `archlab ablate` stored in the run folder (ablate.json, cost.json, latency.json,
results/), so the same folder always gives the same files (named `ablation*` unless --name says):

- `ablation.csv`: one line per ladder row and seed (cost, latency, scores, status, paper numbers);
- `ablation.md`: per row, the paper's quality (FID, or validation loss where the paper ablates by it) /
  params / FLOPs / latency next to the lab's params /
  MACs / FLOPs / predicted and measured latency / FID, KID and validation loss (mean +- std over
  seeds); the row-to-row changes of both with a mark where the lab's direction agrees (ok) or
  disagrees (DIFF) with the paper's, and the reason where it disagrees; failed runs; provenance;
- `ablation_changes.png` (per-row changes, paper vs lab) and `ablation_latency_quality.png`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from dataclasses import dataclass

from archlab import stats
from archlab.ablate import ladder_sha, read_settings, results
from archlab.errors import ArchlabError
from archlab.io import atomic_path, write_atomic
from archlab.ladder import PAPER_KEYS, load_ladder
from archlab.latency.table import runtime
from archlab.verdict import (MACS, PARAMS, PREDICTED, SCORES, UNCHANGED, Change, Noise, ScoreTest, Verdict, compare,
                             measured)
from archlab.verdict import tally as count_verdicts


def load_run(run_dir: str | Path) -> dict:
    """Everything stored in an ablation folder, checked; a folder that is not one is an error."""
    run_dir = Path(run_dir)
    saved = run_dir / "ablate.json"
    if not saved.is_file():
        raise ArchlabError(f"RUN_DIR: {run_dir} is not an ablation folder (no ablate.json)")
    settings, history = read_settings(saved)
    if not Path(settings.ladder).is_file():
        raise ArchlabError(f"{saved}: ladder {settings.ladder} no longer exists")
    ladder = load_ladder(settings.ladder)
    if ladder_sha(ladder) != settings.ladder_sha:
        raise ArchlabError(f"{settings.ladder}: its designs changed since the ablation in {run_dir} (sha "
                           f"{settings.ladder_sha}); run `archlab ablate` again into a new folder")
    for name in ("cost.json", "latency.json"):
        if not (run_dir / name).is_file():
            raise ArchlabError(f"RUN_DIR: {run_dir / name} is missing: run `archlab ablate` into this folder again")
    cost = json.loads((run_dir / "cost.json").read_text())
    if cost.get("ladder_sha") != settings.ladder_sha:
        raise ArchlabError(f"{run_dir}/cost.json: made for another version of {settings.ladder}")
    return {"settings": settings, "ladder": ladder, "invocations": history,
            "cost": {int(k): v for k, v in cost["rows"].items()},
            "latency": json.loads((run_dir / "latency.json").read_text()),
            "results": results(settings, ladder, run_dir)}


@dataclass(frozen=True)
class Score:
    """A score over seeds: mean and std of the finished runs, and seed k's value (None: no result)."""
    mean: float | None
    std: float | None
    seeds: tuple[float | None, ...]


@dataclass(frozen=True)
class Measured:
    ms: float
    cv: float  # run-to-run coefficient of variation


@dataclass(frozen=True)
class RowSummary:
    """A ladder row as the ablation measured it, beside the paper's numbers."""
    index: int
    name: str
    change: str
    paper: dict
    why_differs: dict
    params: int
    macs: int
    flops: int
    predicted_ms: float
    predicted_flag: str
    predicted_error: float | None  # the predictor's leave-one-out error on whole networks (relative)
    measured: dict[str, Measured]  # by latent resolution
    scores: dict[str, Score]  # fid, kid, val_loss
    runs: int
    ok: int
    failed: tuple[dict, ...]
    status: str  # ok, or why no run finished


@dataclass(frozen=True)
class RowChanges:
    """A row against the one above it: one `Change` per metric."""
    index: int
    name: str
    changes: tuple[Change, ...]

    def __getitem__(self, label: str) -> Change:
        return next(c for c in self.changes if c.metric == label)


def _score(values: list[float | None]) -> Score:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return Score(statistics.fmean(finite) if finite else None,
                 statistics.stdev(finite) if len(finite) > 1 else None, tuple(values))


def rows(run: dict) -> list[RowSummary]:
    """One summary per selected ladder row: cost, latency, paper numbers, scores over seeds."""
    settings, lat = run["settings"], run["latency"]
    out = []
    for row in settings.selected(run["ladder"]):
        lr = lat["rows"].get(str(row.index))
        if row.index not in run["cost"] or lr is None:
            raise ArchlabError(f"RUN_DIR: row {row.index} {row.name} has no cost or latency: run `archlab ablate` again")
        c = run["cost"][row.index]
        runs = [r for r in run["results"] if r["index"] == row.index]
        ok = [r for r in runs if r.get("status") == "ok"]
        by_seed = {r["seed"]: r for r in ok}
        out.append(RowSummary(
            row.index, row.name, row.change, dict(row.paper), dict(row.why_differs), c["params"], c["macs"], c["flops"],
            lr["predicted_ms"], lr.get("predicted_flag", ""), lat.get("predicted_error"),
            {str(res): Measured(m["ms"], m["cv"]) for res, m in sorted(lr["measured"].items(), key=lambda x: int(x[0]))},
            {k: _score([by_seed[i].get(k) if i in by_seed else None for i in range(settings.seeds)]) for k in SCORES},
            len(runs), len(ok), tuple(r for r in runs if r.get("status") != "ok"),
            "ok" if ok else (runs[0].get("status", "missing") if runs else "missing")))
    return out


def pairing(summary: list[RowSummary]) -> dict[str, dict]:
    """Per score: does pairing by seed narrow the interval of a row-to-row change, over the whole
    ladder? `paired` is decided once per score (not per row, which would shop for a verdict): paired
    intervals where their median width is below the unpaired one's."""
    out = {}
    for key in SCORES:
        comps = [stats.compare(a.scores[key].seeds, b.scores[key].seeds) for a, b in zip(summary, summary[1:])
                 if b.index == a.index + 1]
        gains = [c.pairing_gain for c in comps if c.pairing_gain is not None]
        corrs = [c.correlation for c in comps if c.correlation is not None]
        gain = statistics.median(gains) if gains else None
        out[key] = {"paired": gain is not None and gain > 1, "pairing_gain": gain,
                    "correlation": statistics.median(corrs) if corrs else None, "pairs": len(gains)}
    return out


def changes(summary: list[RowSummary]) -> list[RowChanges]:
    """Row-to-row changes, ours and the paper's, each decided by `verdict.compare` with its noise:
    for a score, the 95% interval over seeds of the change (paired by seed where pairing helps, see
    `pairing`; fewer than MIN_SEEDS seeds with results give no verdict); for a measured latency, 2x
    the run-to-run CVs; for a predicted latency, 2x the predictor's leave-one-out error on whole
    networks; cost is exact."""
    paired = pairing(summary)
    out = []
    for prev, cur in zip(summary, summary[1:]):
        if cur.index != prev.index + 1:
            continue  # rows not adjacent in the ladder (a --rows selection): no change to compare

        def cmp(metric, before, after, noise=None):
            return compare(metric, (before, after), cur.paper, prev.paper, cur.why_differs, noise)

        ch = [cmp(PARAMS, prev.params, cur.params), cmp(MACS, prev.macs, cur.macs),
              cmp(PREDICTED, prev.predicted_ms, cur.predicted_ms, _predicted_noise(prev, cur))]
        for res, m in cur.measured.items():
            before = prev.measured.get(res)
            ch.append(cmp(measured(res), before and before.ms, m.ms, before and _measured_noise(before, m)))
        for key, metric in SCORES.items():
            a, b = prev.scores[key], cur.scores[key]
            ch.append(cmp(metric, a.mean, b.mean, score_test(a, b, paired[key]["paired"])))
        out.append(RowChanges(cur.index, cur.name, tuple(ch)))
    return out


def score_test(a: Score, b: Score, paired: bool) -> ScoreTest:
    """The change of a score from `a` to `b` over seeds, and whether its interval decides it."""
    c = stats.compare(a.seeds, b.seeds)
    iv = c.interval(paired)
    fields = dict(seeds=c.seeds, paired=paired, mean=c.mean, correlation=c.correlation, pairing_gain=c.pairing_gain,
                  low=iv.low if iv else None, high=iv.high if iv else None, seeds_to_resolve=c.seeds_to_resolve(paired),
                  before=a.mean)
    if c.seeds < stats.MIN_SEEDS or iv is None:
        return ScoreTest(False, f"{c.seeds} seed(s) with results on both rows: a verdict needs at least "
                                f"{stats.MIN_SEEDS}", **fields)
    if not iv.excludes_zero:
        return ScoreTest(False, f"our change ({c.mean:+.3g}) has a 95% interval over {c.seeds} seeds "
                                f"({'paired' if paired else 'unpaired'}) of [{iv.low:+.3g}, {iv.high:+.3g}], "
                                "which includes 0", **fields)
    return ScoreTest(True, **fields)


def _within(change: float, noise: float) -> Noise:
    return Noise(abs(change) > noise, f"our change ({change:+.3g}) is within the noise (+-{noise:.3g})")


def _measured_noise(a: Measured, b: Measured) -> Noise:
    return _within(b.ms - a.ms, 2 * math.hypot(a.ms * a.cv, b.ms * b.cv))


def _predicted_noise(a: RowSummary, b: RowSummary) -> Noise | None:
    if b.predicted_error is None:
        return None  # an uncalibrated predictor has no error estimate
    return _within(b.predicted_ms - a.predicted_ms, 2 * b.predicted_error * math.hypot(a.predicted_ms, b.predicted_ms))


def tally(ch: list[RowChanges]) -> dict[str, int]:
    return count_verdicts(c for rc in ch for c in rc.changes)


# ---- files --------------------------------------------------------------------------------------

LARGE = {"fid": 0.05, "val_loss": 0.005}  # a "large" quality change of the paper's (val loss moves in the 3rd digit)


def paper_quality(summary: list[RowSummary]) -> tuple[str, str]:
    """The paper's quality metric, as a `paper:` key and a label: FID (SnapGen) or validation loss (SnapGen++)."""
    if any("fid" in r.paper for r in summary) or not any("val_loss" in r.paper for r in summary):
        return "fid", "FID"
    return "val_loss", "val loss"


def csv_frame(run: dict, summary: list[dict]):
    import pandas as pd

    by_index = {s.index: s for s in summary}
    lines = []
    for r in run["results"]:
        s = by_index[r["index"]]
        line = {"index": r["index"], "name": r["name"], "seed": r["seed"], "train_seed": r.get("train_seed"),
                "status": r.get("status"), "reason": r.get("reason", ""),
                **{k: r.get(k) for k in ("fid", "kid", "kid_std", "val_loss", "train_loss", "steps", "seconds")},
                "fid_extractor": r.get("fid_extractor"), "proxy_params": r.get("params"),
                "params": s.params, "macs": s.macs, "flops": s.flops, "predicted_ms": s.predicted_ms}
        line.update({f"measured_ms_{res}": m.ms for res, m in s.measured.items()})
        line.update({f"paper_{k}": s.paper.get(k) for k in PAPER_KEYS})
        lines.append(line)
    return pd.DataFrame(lines)


def _f(v, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def _pm(score: Score, fmt: str, status: str = "ok") -> str:
    if score.mean is None:
        return "-" if status == "ok" else status  # not computed (e.g. --samples 0), or every run failed
    return format(score.mean, fmt) + ("" if score.std is None else " +- " + format(score.std, fmt))


def _runtime_name(lat: dict) -> str:
    """The runtime the ablation's latencies come from, as the report names it."""
    name = (lat.get("runtime") or runtime(lat)).split()[0]
    return {"onnxruntime": "ONNX Runtime", "executorch-xnnpack": "ExecuTorch (XNNPACK)", "coreml": "Core ML"}.get(name, name)


def _ratio(v, base) -> str:
    return "" if v is None or not base else f" ({v / base:.2f})"


def markdown(run: dict, summary: list[dict], ch: list[dict], command: str, name: str = "ablation") -> str:
    s, lat = run["settings"], run["latency"]
    last = run["invocations"][-1] if run["invocations"] else {}
    t, d = s.train, s.data
    res = lat["resolutions"]
    extractors = sorted({r.get("fid_extractor") for r in run["results"] if r.get("fid_extractor")})
    base = summary[0]
    lines = [f"# Ablation ladder: {run['ladder'].name}", "",
             f"The paper's ladder ({run['ladder'].source}) rebuilt by the lab: every row costed at paper scale, its "
             f"latency predicted and measured in {_runtime_name(lat)}, and trained at proxy scale ({s.seeds} seed"
             f"{'s' if s.seeds > 1 else ''} per row). Paper setting: {run['ladder'].setting}.", "",
             "Regenerate:", "", "```", s.command or "(command not recorded)", command, "```", "",
             "## Per row", "",
             "Latency in ms, with the ratio to the first row in brackets. Paper FLOPs are the paper's (convention "
             "unconfirmed); ours are MACs as fvcore counts them (FLOPs = 2 x MACs). Predicted latency: from "
             f"`{lat['table']}` at {lat['predicted_resolution']}x{lat['predicted_resolution']} latent; measured: "
             + (f"end to end in {_runtime_name(lat)} on `{lat['device']}` ({lat['threads']} thread"
                f"{'s' if lat['threads'] > 1 else ''}) at " + ", ".join(f"{r}x{r}" for r in res) + " latent"
                if res else "not in this run (`--measure none`)")
             + f". Scores: mean +- std over seeds; FID and KID with {', '.join(extractors) or 'no extractor'} features.",
             ""]
    quality, quality_label = paper_quality(summary)
    head = (["#", "row", f"paper {quality_label}", "paper params M", "paper FLOPs G", "paper latency"]
            + ["params M", "MACs G", "FLOPs G", f"predicted {lat['predicted_resolution']}^2"]
            + [f"measured {r}^2" for r in res] + ["FID", "KID", "val loss", "runs ok"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        p = r.paper
        cells = [str(r.index), r.name, _f(p.get(quality), "g"), _f(p.get("params_m"), "g"), _f(p.get("flops_g"), "g"),
                 _f(p.get("latency_ms"), "g") + _ratio(p.get("latency_ms"), base.paper.get("latency_ms")),
                 f"{r.params / 1e6:.1f}", f"{r.macs / 1e9:.1f}", f"{r.flops / 1e9:.1f}",
                 f"{r.predicted_ms:.0f}" + _ratio(r.predicted_ms, base.predicted_ms)
                 + (f" [{r.predicted_flag}]" if r.predicted_flag else "")]
        cells += [f"{r.measured[str(x)].ms:.0f}" + _ratio(r.measured[str(x)].ms, base.measured[str(x)].ms) for x in res]
        cells += [_pm(r.scores["fid"], ".1f", r.status), _pm(r.scores["kid"], ".4f", r.status),
                  _pm(r.scores["val_loss"], ".4f", r.status), f"{r.ok}/{r.runs}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Row-to-row changes", "",
              "Each row against the one above it: the paper's change and ours, and whether the directions agree "
              f"(ok), disagree (DIFF, with the reason) or ours is within noise (~). Changes under {UNCHANGED:.1%} "
              f"count as no change. Every quality metric is compared with the paper's {quality_label} change (lower is better "
              f"for all of them). Noise: for a score, the 95% interval of the change over seeds (at least {stats.MIN_SEEDS} "
              "seeds; see the next section); for measured latency 2x the run-to-run CVs combined; for predicted "
              "latency 2x the predictor's leave-one-out error on whole networks.",
              ""] + ([f"![row-to-row changes]({name}_changes.png)", ""] if ch else ["No two adjacent rows were run.", ""])
    metrics = [m.metric for m in ch[0].changes] if ch else []
    if ch:
        lines += ["| # | row | " + " | ".join(f"{m} (paper / ours)" for m in metrics) + " |",
                  "|" + "---|" * (2 + len(metrics))]
        for c in ch:
            cells = [f"{_pct(m.paper)} / {_pct(m.ours)} {m.verdict.mark}".strip() for m in c.changes]
            lines.append(f"| {c.index} | {c.name} | " + " | ".join(cells) + " |")
        reasons = [(c, m) for c in ch for m in c.changes if m.verdict in (Verdict.DISAGREE, Verdict.NOISE)]
        if reasons:
            lines += ["", "Where ours disagrees with the paper (DIFF) or cannot tell (~):", ""]
            lines += [f"- row {c.index} {c.name}, {m.metric} ({m.verdict.mark}): {m.reason}"
                      for c, m in reasons]
        n = tally(ch)
        lines += ["", f"Directions: {n['agree']} agree with the paper, {n['disagree']} disagree, {n['noise']} within "
                  "our noise (no verdict)."]
        lines += _quality_section(summary, ch)
    lines += ["", "## Latency and quality", "", f"![latency vs quality]({name}_latency_quality.png)", ""]
    failed = [f for r in summary for f in r.failed]
    if failed:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- row {f['index']} {f['name']}, seed {f['seed']}: {f.get('status')}: {f.get('reason', '')}"
                  for f in failed]
        lines.append("")
    lines += ["## Provenance", "",
              f"- ladder: `{Path(s.ladder).name}` (designs sha256 {s.ladder_sha}); rows {'all' if s.rows is None else s.rows}",
              f"- dataset: `{_short(d['spec'])}` at {d['resolution']} px, classes {d.get('classes') or 'all'}, "
              f"{d.get('per_class') or 'all'} train / {d.get('val_per_class') or 'default'} val images per class",
              f"- proxy: width x{t['width_mult']} (same topology), pixels at {d['resolution']} px, class as "
              f"{t['context_len']} context tokens of dim {t['context_dim']}; {t['steps']} steps, batch {t['batch']}, "
              f"lr {t['lr']}, {t['timesteps']} timesteps, EMA {t['ema']}",
              f"- seeds: {s.seeds} (training seeds {t['seed']}..{t['seed'] + s.seeds - 1}); scores on the EMA weights: "
              f"val loss on up to {t['val_images']} held-out images at fixed t and noise; FID/KID on {t['samples']} samples "
              f"({t['sample_steps']} Euler steps, CFG {t['cfg_scale']}) against the validation images, extractor "
              f"{', '.join(extractors) or '-'}",
              f"- latency: device `{lat['device']}` ({lat.get('cpu')}), {lat['threads']} thread(s); predictor table "
              f"`{lat['table']}` ({lat.get('runtime') or runtime(lat)}); measured tables: "
              + (", ".join(sorted({f"`{m['table']}` ({m.get('runtime') or runtime(m)})"
                                   for r in lat["rows"].values() for m in r["measured"].values()})) or "none"),
              f"- training: {s.cpus_per_trial} CPU(s) per trial, {s.concurrency} at a time, on Ray Tune",
              f"- python {last.get('python')}; " + ", ".join(f"{k} {v}" for k, v in last.get("packages", {}).items() if v),
              "- made by these runs of `archlab ablate` (each resumes the folder; finished results are kept):"]
    lines += [f"  - {h.get('at')}: git commit {h.get('git_commit')}"
              f"{' (uncommitted changes)' if h.get('git_dirty') else ''}" for h in run["invocations"]]
    return "\n".join(lines) + "\n"


def _quality_section(summary: list[dict], ch: list[dict]) -> list[str]:
    """The quality changes over seeds: each change's 95% interval, and what pairing by seed bought."""
    paired = pairing(summary)
    lines = ["", "## Quality changes over seeds", "",
             "Each score's change from the row above, mean over seeds with its 95% interval: paired (the t interval "
             "of the per-seed differences; seed k gives both rows the same batches, timesteps, noise and the initial "
             "weights of the blocks they share) where pairing narrows the interval over the ladder, Welch's "
             "unpaired interval where it does not. A change whose interval includes 0 gets no verdict (~).", "",
             "| score | seed-to-seed correlation of two adjacent rows (median) | unpaired / paired interval width "
             "(median) | interval used |", "|---|---|---|---|"]
    for key, label in (("val_loss", "val loss"), ("fid", "FID"), ("kid", "KID")):
        p = paired[key]
        lines.append(f"| {label} | {_f(p['correlation'], '.2f') or '-'} | {_f(p['pairing_gain'], '.2f') or '-'} | "
                     f"{'paired' if p['paired'] else 'unpaired'} |")
    quality, qlabel = paper_quality(summary)
    lines += ["", f"| # | row | paper {qlabel} | " + " | ".join(f"{k} change [95% interval]" for k in ("val loss", "FID", "KID"))
              + " |", "|---|---|---|---|---|---|"]
    for c in ch:
        cells = []
        for label in ("val loss", "FID", "KID"):
            t = c[label].test
            cells.append("-" if not isinstance(t, ScoreTest) or t.low is None else
                         f"{t.mean:+.3g} [{t.low:+.3g}, {t.high:+.3g}] {c[label].verdict.mark}".strip())
        lines.append(f"| {c.index} | {c.name} | {_pct(c['FID'].paper)} | " + " | ".join(cells) + " |")
    big = [c for c in ch if c["FID"].paper is not None and abs(c["FID"].paper) >= LARGE[quality]]
    if big:
        lines += ["", f"The paper's large quality changes ({qlabel} by {100 * LARGE[quality]:g}% or more), and what the lab "
                      "finds:", ""]
        for c in big:
            verdicts = []
            for label in ("val loss", "FID", "KID"):
                v = c[label].verdict
                verdict = {Verdict.AGREE: "agrees", Verdict.DISAGREE: "disagrees", Verdict.NOISE: "cannot tell (within noise",
                           Verdict.NONE: "not measured"}[v]
                if v is Verdict.NOISE:
                    t = c[label].test
                    if t.low is not None and t.before:
                        verdict += (f": the change lies within [{_pct(t.low / abs(t.before))}, "
                                    f"{_pct(t.high / abs(t.before))}] of the row above")
                    n = t.seeds_to_resolve
                    verdict += (f"; resolving a change of the measured size would need about {n} seeds)" if n else
                                "; the measured change is too small for its noise to resolve at any practical number "
                                "of seeds)")
                verdicts.append(f"{label} {verdict}")
            lines.append(f"- row {c.index} {c.name} (paper {qlabel} {_pct(c['FID'].paper)}): " + "; ".join(verdicts))
    return lines


def _short(spec: str) -> str:
    p = Path(spec)
    return spec if spec == "synthetic" else "/".join(p.parts[-2:])


def plots(summary: list[dict], ch: list[dict], resolutions: list[str], out: Path, name: str = "ablation") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    if ch:
        metrics = [m.metric for m in ch[0].changes]
        fig, axes = plt.subplots(1, len(metrics), figsize=(2.3 * len(metrics), 3.6), dpi=110, sharey=True)
        y = np.arange(len(ch))
        for ax, k in zip(np.atleast_1d(axes), range(len(metrics))):
            paper = [c.changes[k].paper for c in ch]
            ours = [c.changes[k].ours for c in ch]
            ax.barh(y - 0.2, [100 * v if v is not None else 0 for v in paper], 0.4, color="0.65", label="paper")
            ax.barh(y + 0.2, [100 * v if v is not None else 0 for v in ours], 0.4, color="C0", label="lab")
            for i, c in enumerate(ch):
                mark = c.changes[k].verdict.mark
                if mark:
                    ax.annotate(mark, (0.98, i + 0.2), xycoords=("axes fraction", "data"), ha="right", va="center",
                                fontsize=7, color="C3" if mark == "DIFF" else "0.3")
            ax.axvline(0, color="k", lw=0.6)
            ax.margins(x=0.25)
            ax.set_title(metrics[k], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("change vs row above (%)", fontsize=7)
        ax0 = np.atleast_1d(axes)[0]
        ax0.set_yticks(y, [f"{c.index} {c.name}" for c in ch])
        ax0.invert_yaxis()
        ax0.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        paths.append(_save(fig, out / f"{name}_changes.png"))
        plt.close(fig)
    else:
        (out / f"{name}_changes.png").unlink(missing_ok=True)  # not a stale one from another run

    res = str(resolutions[-1]) if resolutions else None
    latency = (lambda r: r.measured[res].ms) if res else (lambda r: r.predicted_ms)
    lat_label = f"measured latency at {res}x{res} (ms)" if res else "predicted latency (ms)"
    quality = [("fid", "FID (lab)"), ("val_loss", "validation loss (lab)")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=110)
    for ax, (key, label) in zip(axes[:2], quality):
        pts = [(latency(r), r.scores[key].mean, r.scores[key].std or 0, r) for r in summary if r.scores[key].mean is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", color="C0", ms=4)
            for x, yv, _, r in pts:
                ax.annotate(str(r.index), (x, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(lat_label, fontsize=8)
        ax.set_ylabel(label, fontsize=8)
    key, label = paper_quality(summary)
    pts = [(r.paper["latency_ms"], r.paper[key], r) for r in summary if "latency_ms" in r.paper and key in r.paper]
    if pts:
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="0.5", ms=4)
        for x, yv, r in pts:
            axes[2].annotate(str(r.index), (x, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes[2].set_xlabel("paper latency, iPhone, 1024 px (ms)", fontsize=8)
    axes[2].set_ylabel(f"paper {label} (ImageNet 256 px)", fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.suptitle("latency vs quality along the ladder (numbers: row index)", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, out / f"{name}_latency_quality.png"))
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    return path


def write_report(run_dir: str | Path, out: str | Path, command: str, name: str = "ablation") -> dict:
    """Write NAME.md / NAME.csv / the plots (NAME_changes.png, NAME_latency_quality.png) into `out`;
    returns the summary rows and changes."""
    run = load_run(run_dir)
    summary = rows(run)
    if not summary:
        raise ArchlabError(f"RUN_DIR: {run_dir} has no rows")
    resolutions = run["latency"]["resolutions"]
    ch = changes(summary)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / f"{name}.csv") as tmp:
        csv_frame(run, summary).to_csv(tmp, index=False)
    plots(summary, ch, resolutions, out, name)
    write_atomic(out / f"{name}.md", markdown(run, summary, ch, command, name))
    return {"rows": summary, "changes": ch, "out": str(out)}
