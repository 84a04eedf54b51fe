"""Proxy fidelity: does a cheap proxy training rank designs the way a long one does?

A fixed panel of designs (the ablation ladder's rows plus seeded samples of a search space) is
trained with every proxy preset, K seeds each, and once (or more) with the `reference` preset,
which trains at least 8x the default preset's compute on the same data. For every preset and
score the benchmark measures:

- Kendall tau and Spearman rho of the preset's ranking (mean over seeds) against the reference's
  ranking by the same score and by its validation loss, with bootstrap intervals over designs;
- the seed noise against the spread between designs (`stats.noise_to_spread`);
- CPU-minutes per training (training + scoring, x threads; GPU runs are counted apart);
- on the ladder rows: Kendall tau against the paper's own FID ranking.

Every training is a trials-engine job (`archlab.trials`) with its result in
`<results>/<design>/<preset>-seed<k>.json`: small files that are committed
(`reports/proxy_fidelity/results/`), so the expensive reference trainings survive across sessions
and machines; checkpoints stay in the (uncommitted) work folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from archlab.cluster import TrialSettings
from archlab.errors import ArchlabError
from archlab.io import folder_lock, write_atomic
from archlab.schema import at_least, setting
from archlab.trials import Job, read

SCORES = ("val_loss", "fid", "kid")
# scores derived after training from what a run kept: the validation loss at low / high timesteps (from
# its per-timestep values), its training loss curve extrapolated to 4x its steps, and FID / KID of its
# saved samples with the small randconv extractor
DERIVED = ("val_loss_low_t", "val_loss_high_t", "train_loss_4x", "fid_randconv", "kid_randconv")
EXTRAPOLATE = 4  # train_loss_4x: the fitted curve read at this many times the run's steps
ALL_SCORES = SCORES + DERIVED
REFERENCE_SEED = 1000  # the reference's seeds are not the presets': they share no batches, noise or init


@dataclass(frozen=True)
class Design:
    name: str
    config: dict  # ArchConfig.to_dict() at paper scale
    source: str  # "ladder row N" or "space sample N"
    paper_fid: float | None = None


def panel(ladder: str, space: str, samples: int, seed: int = 0) -> list[Design]:
    """The ladder's rows and `samples` distinct seeded draws of the space (none equal to a row)."""
    from archlab.ladder import load_ladder
    from archlab.space import load_space

    lad, sp = load_ladder(ladder), load_space(space)
    rows = [Design(f"L{r.index}-{r.name}", r.config.to_dict(), f"ladder row {r.index}", r.paper.get("fid"))
            for r in lad.rows]
    drawn = sp.sample(samples, seed, prefix="S", avoid={r.config.digest() for r in lad.rows})
    return rows + [Design(f"S{i}", cfg.to_dict(), f"{Path(space).name} sample {i} (seed {seed})")
                   for i, (_, cfg) in enumerate(drawn)]


@dataclass
class FidelitySettings(TrialSettings):
    ladder: str = "search_spaces/snapgen_ablation.yaml"
    space: str = "search_spaces/snapgen_unet.yaml"
    space_samples: int = setting(8, valid=at_least(0), rule=">= 0")
    panel_seed: int = 0
    presets: list[str] = field(default_factory=lambda: ["smoke", "cpu"])  # names or FILE.yaml:NAME
    reference: str = "reference"
    seeds: int = setting(3, valid=at_least(2), rule=">= 2")
    reference_seeds: int = setting(1, valid=at_least(1), rule=">= 1")
    default_preset: str = "cpu"

    def proxies(self) -> list:
        """The presets compared, then the reference (Preset objects)."""
        from archlab import presets

        return [presets.get(p) for p in self.presets] + [presets.get(self.reference)]

    def validate(self) -> None:
        self.validate_trials()
        *compared, ref = self.proxies()
        names = [p.name for p in compared]
        if len(set(names + [ref.name])) != len(names) + 1:
            raise ArchlabError(f"--presets: {names} and the reference {ref.name!r} must have distinct names")
        if self.default_preset not in names:
            raise ArchlabError(f"--default-preset: {self.default_preset!r} is not one of --presets {names}")
        default = compared[names.index(self.default_preset)]
        if ref.compute < 8 * default.compute:
            raise ArchlabError(f"--reference: {ref.name} trains on {ref.compute:,} images, under 8x the "
                               f"{default.name} preset's {default.compute:,}")


def _data(settings: FidelitySettings, preset) -> dict:
    return {**settings.data, "resolution": preset.image_size}


def identity(settings: FidelitySettings, designs: list[Design]) -> dict:
    """What makes two result folders' trainings the same: the panel, the data and the presets' values."""
    data = {k: v for k, v in settings.data.items() if k != "resolution"}
    if data.get("spec") != "synthetic":
        data["spec"] = Path(data["spec"]).name  # the same folder mounted elsewhere is the same data
    return {"panel": panel_digest(designs), "data": data, "presets": {p.name: _values(p.to_dict()) for p in settings.proxies()}}


def _values(preset: dict) -> dict:
    """What a preset trains with: its settings, not its description (rewording one keeps its results)."""
    return {k: v for k, v in preset.items() if k != "description"}


def jobs(settings: FidelitySettings, designs: list[Design], results: Path, work: Path) -> list[Job]:
    *compared, ref = settings.proxies()
    runs = [(p, k, k) for p in compared for k in range(settings.seeds)]
    runs += [(ref, k, REFERENCE_SEED + k) for k in range(settings.reference_seeds)]
    out = []
    for p, k, seed in runs:  # seed by seed across the panel: an interrupted run leaves whole seeds
        for d in designs:
            train = asdict(p.train_config(seed=seed, device=settings.train.get("device", "cpu")))
            out.append(Job(key=f"{d.name}-{p.name}-seed{k}", arch=d.config, data=_data(settings, p), train=train,
                           result=str(results / d.name / f"{p.name}-seed{k}.json"),
                           workdir=str(work / d.name / f"{p.name}-seed{k}"),
                           meta={"design": d.name, "preset": p.name, "seed": k, "train_seed": seed,
                                 "compute": p.compute}))
    return out


def open_results(settings: FidelitySettings, designs: list[Design], results: Path) -> None:
    """Refuse a results folder made with another panel or data, or with other values under a preset's
    name; a preset new to the folder is added. Records what the folder holds in `fidelity.json`."""
    saved = results / "fidelity.json"
    ours = identity(settings, designs)
    if saved.is_file():
        theirs = json.loads(saved.read_text()).get("identity")
        if not isinstance(theirs, dict):
            raise ArchlabError(f"{saved}: not a fidelity results record; pick another --results folder")
        for key in ("panel", "data"):
            if theirs.get(key) != ours[key]:
                raise ArchlabError(f"--results: {results} holds trainings made with another {key}; pick another folder")
        for name, values in ours["presets"].items():
            if name in theirs.get("presets", {}) and _values(theirs["presets"][name]) != values:
                raise ArchlabError(f"--results: {results} holds trainings of preset {name!r} made with other values; "
                                   "rename the preset or pick another folder")
        ours["presets"] = {**{k: _values(v) for k, v in theirs.get("presets", {}).items()}, **ours["presets"]}
    write_atomic(saved, json.dumps({"identity": ours, "settings": asdict(settings)}, indent=1) + "\n")


# ---- analysis -----------------------------------------------------------------------------------

def _runs(results: list[dict]) -> dict:
    """{design: {preset: {seed: result}}} of the finished (status ok) runs."""
    out: dict = {}
    for r in results:
        if r.get("status") == "ok":
            out.setdefault(r["design"], {}).setdefault(r["preset"], {})[r["seed"]] = r
    return out


def cpu_minutes(r: dict) -> float | None:
    """A training's cost on a CPU: wall time of training and scoring x torch threads (None on a GPU)."""
    if r.get("device", "cpu") != "cpu":
        return None
    return (r.get("seconds", 0) + r.get("score_seconds", 0)) * (r.get("threads") or 1) / 60


def _by_seed(per: list[dict], score: str) -> tuple[list[list[float | None]], list[float | None], list[int]]:
    """(each design's score per seed, each design's mean, the seeds used) for one preset's runs (`per`: one
    {seed: result} per design). Means are over the seeds every trained design has: seed k gives each design
    the same batches and noise, so a design with an extra seed would be compared on other luck (an
    interrupted run, or a seed still training)."""
    n_seeds = max((max(x) + 1 for x in per if x), default=0)
    by_design = [[_score(x[k], score) if k in x else None for k in range(n_seeds)] for x in per]  # row k = seed k
    trained = [row for row in by_design if any(v is not None for v in row)]
    common = [k for k in range(n_seeds) if trained and all(row[k] is not None for row in trained)]
    return by_design, [_mean([row[k] for k in common] if common else row) for row in by_design], common


def analyse(settings: FidelitySettings, designs: list[Design], results: list[dict], boot: int = 2000) -> dict:
    """The benchmark's numbers (the shape of `reports/proxy_fidelity.json`)."""
    from archlab.stats import kendall, noise_to_spread, rank_agreement

    runs = _runs(results)
    names = [d.name for d in designs]
    proxies = [p.name for p in settings.proxies()]
    reference = proxies[-1]
    ref_runs = [runs.get(n, {}).get(reference, {}) for n in names]
    ref = {s: dict(zip(names, _by_seed(ref_runs, s)[1])) for s in ALL_SCORES}
    out = {"designs": names, "default_cpu_preset": settings.default_preset, "reference": reference,
           "reference_seeds": settings.reference_seeds, "seeds": settings.seeds,
           "hardware": sorted({r.get("hardware", "?") for r in results if r.get("status") == "ok"}),
           "missing": sorted(r["key"] for r in results if r.get("status") != "ok"), "presets": {}}
    ladder = [d for d in designs if d.paper_fid is not None]
    for p in proxies:
        per = [runs.get(n, {}).get(p, {}) for n in names]
        costs = [c for runs_of in per for c in (cpu_minutes(r) for r in runs_of.values()) if c is not None]
        entry = {"cpu_minutes_per_design": statistics.median(costs) if costs else None,
                 "extractors": sorted({r["fid_extractor"] for x in per for r in x.values() if r.get("fid_extractor")}),
                 "trainings": sum(len(x) for x in per), "hardware": sorted({r.get("hardware", "?") for x in per
                                                                             for r in x.values()}), "scores": {}}
        for s in ALL_SCORES:
            by_design, means, common = _by_seed(per, s)
            have = [i for i, m in enumerate(means) if m is not None and ref[s][names[i]] is not None]
            score = {"designs": len(have), "seeds_ranked": len(common)}
            if p != reference:
                agree = rank_agreement([means[i] for i in have], [ref[s][names[i]] for i in have], boot=boot)
                vs_val = [i for i in have if ref["val_loss"][names[i]] is not None]
                agree_val = rank_agreement([means[i] for i in vs_val], [ref["val_loss"][names[i]] for i in vs_val],
                                           boot=boot)
                score["kendall_tau_per_seed"] = [kendall([by_design[i][k] for i in have], [ref[s][names[i]] for i in have])
                                                 for k in common]  # a preset with fewer seeds is compared seed to seed
                score.update(kendall_tau=agree["kendall_tau"], kendall_tau_ci=agree["kendall_tau_ci"],
                             spearman_rho=agree["spearman_rho"], spearman_rho_ci=agree["spearman_rho_ci"],
                             kendall_tau_vs_reference_val_loss=agree_val["kendall_tau"],
                             kendall_tau_vs_reference_val_loss_ci=agree_val["kendall_tau_ci"])
            score.update(noise_to_spread(by_design))
            score["seed_vs_seed_tau"] = seed_vs_seed_tau([by_design[i] for i in have])  # the designs ranked vs the reference
            lad = [(means[names.index(d.name)], d.paper_fid) for d in ladder if means[names.index(d.name)] is not None]
            score["ladder_kendall_tau_vs_paper_fid"] = rank_agreement(*zip(*lad), boot=boot)["kendall_tau"] \
                if len(lad) >= 3 else None
            if p != reference:
                score["ladder_steps_as_reference"] = ladder_steps(
                    [means[names.index(d.name)] for d in ladder], [ref[s][d.name] for d in ladder])
            score["means"] = {names[i]: means[i] for i in range(len(names)) if means[i] is not None}
            entry["scores"][s] = score
        out["presets"][p] = entry
    out["reference_noise"] = reference_noise(settings, names, ref_runs, runs)
    return out


def reference_noise(settings: FidelitySettings, names: list[str], ref_runs: list[dict], runs: dict) -> dict:
    """How reproducible the reference's own ranking (validation loss) is: its first two seeds' rankings of
    the designs that have both, and, on those designs, the default preset's ranking against each reference
    seed alone. A proxy cannot be expected to rank closer to one reference seed than the other seed does."""
    from archlab.stats import kendall

    both = [i for i, x in enumerate(ref_runs) if all(_score(x.get(k, {}), "val_loss") is not None for k in (0, 1))]
    out = {"designs": len(both), "kendall_tau": None, "default_preset_vs_each_seed": None}
    if len(both) < 3:
        return out
    seed = [[_score(ref_runs[i][k], "val_loss") for i in both] for k in (0, 1)]
    out["kendall_tau"] = kendall(*seed)
    _, means, _ = _by_seed([runs.get(names[i], {}).get(settings.default_preset, {}) for i in both], "val_loss")
    if None not in means:
        out["default_preset_vs_each_seed"] = [kendall(means, seed[0]), kendall(means, seed[1])]
    return out


def ladder_steps(ours: list[float | None], reference: list[float | None]) -> list[int] | None:
    """[same, of]: how many of the ladder's row-to-row changes go the same way (up or down) under the
    preset as under the reference (the ablation report's question, asked of the proxy)."""
    steps = [(b - a, d - c) for a, b, c, d in zip(ours, ours[1:], reference, reference[1:])
             if None not in (a, b, c, d)]
    return [sum((x > 0) == (y > 0) for x, y in steps), len(steps)] if steps else None


def seed_vs_seed_tau(by_design: list[list[float | None]]) -> float | None:
    """How reproducible a single seed's ranking is: Kendall tau between the designs' rankings by two
    different seeds, averaged over pairs of seeds. Beside the tau against the reference it tells noise
    (this is low) from a proxy that ranks another way than the long training (this is high, that low)."""
    from itertools import combinations

    from archlab.stats import kendall

    seeds = max((len(v) for v in by_design), default=0)
    taus = []
    for a, b in combinations(range(seeds), 2):
        pairs = [(v[a], v[b]) for v in by_design if len(v) > max(a, b) and v[a] is not None and v[b] is not None
                 and math.isfinite(v[a]) and math.isfinite(v[b])]
        if len(pairs) >= 3:
            t = kendall(*zip(*pairs))
            if t is not None:
                taus.append(t)
    return statistics.fmean(taus) if taus else None


def _score(result: dict, name: str) -> float | None:
    return result.get(name, result.get("derived", {}).get(name))


def extrapolate(history: list, factor: float = EXTRAPOLATE) -> float | None:
    """A run's training loss at `factor` x its steps, from the smoothed loss it logged every 25 steps:
    L(s) = a + b (s / S)^-c (S its last step; a, b >= 0, c in [0.05, 5]) fitted by least squares on the
    points after the first; None with fewer than 4 such points or no fit."""
    import numpy as np
    from scipy.optimize import curve_fit

    h = np.asarray(history, dtype=float)[1:]
    if len(h) < 4 or not np.isfinite(h).all():
        return None
    x, y = h[:, 0] / h[-1, 0], h[:, 1]

    def curve(s, a, b, c):
        return a + b * np.power(s, -c)

    try:
        (a, b, c), _ = curve_fit(curve, x, y, p0=[0.8 * y[-1], max(y[0] - y[-1], 1e-3), 1.0],
                                 bounds=([0, 0, 0.05], [np.inf, np.inf, 5]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return float(curve(factor, a, b, c))


def derive(jobs_: list[Job]) -> int:
    """Add the DERIVED scores that finished results lack (written back in place; one that cannot be
    computed from what the run kept is recorded as None); returns how many results changed. The randconv
    scores need the run's folder (its samples.pt) and are left out when it is gone."""
    import torch

    from archlab.data import DataConfig, load_dataset
    from archlab.train import TrainConfig, score_images

    data, n = {}, 0
    for j in jobs_:
        r = read(j.result)
        if not r or r.get("status") != "ok":
            continue
        d = dict(r.get("derived", {}))
        vt = r.get("val_loss_t") or []
        if vt and "val_loss_low_t" not in d:
            d["val_loss_low_t"] = statistics.fmean(vt[:len(vt) // 2])  # t < 0.5: near the data
            d["val_loss_high_t"] = statistics.fmean(vt[len(vt) // 2:])  # t > 0.5: near the noise
        if "train_loss_4x" not in d:
            d["train_loss_4x"] = extrapolate(r.get("history") or [])
        samples = Path(j.workdir) / "samples.pt"
        if "fid_randconv" not in d and samples.is_file():
            key = json.dumps(j.data, sort_keys=True)
            if key not in data:
                data[key] = load_dataset(DataConfig(**j.data))
            s = score_images(torch.load(samples), data[key], "randconv", TrainConfig(**j.train).fid_reference)
            d["fid_randconv"], d["kid_randconv"] = s["fid"], s["kid"]
        if d != r.get("derived", {}):
            write_atomic(j.result, json.dumps({**r, "derived": d}, indent=1) + "\n")
            n += 1
    return n


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return statistics.fmean(v) if v else None


def panel_digest(designs: list[Design]) -> str:
    return hashlib.sha256(json.dumps([(d.name, d.config) for d in designs], sort_keys=True).encode()).hexdigest()[:16]


# ---- running ------------------------------------------------------------------------------------

def run(settings: FidelitySettings, results: str | Path, work: str | Path, only: list[str] | None = None,
        on_event=None) -> dict:
    """Train whatever the results folder lacks (`only`: just these presets, e.g. the reference on a
    GPU), then analyse everything it holds. `on_event`: the trials engine's progress events. One run
    at a time holds the `work` folder."""
    settings.validate()
    settings.locate_data()
    designs = panel(settings.ladder, settings.space, settings.space_samples, settings.panel_seed)
    results, work = Path(results).resolve(), Path(work).resolve()  # trials run in their own folders
    with folder_lock(work, "--work"):
        return _run(settings, designs, results, work, only, on_event)


def _run(settings: FidelitySettings, designs: list[Design], results: Path, work: Path, only, on_event) -> dict:
    from archlab.trials import remember, run_jobs

    open_results(settings, designs, results)
    every = jobs(settings, designs, results, work)
    remember(every)  # results committed with the report serve any batch that asks for the same training
    todo = [j for j in every if only is None or j.meta["preset"] in only]
    # cheapest first: every design gets its short proxies before the long reference trainings start
    todo.sort(key=lambda j: (j.meta["compute"], j.meta["seed"], j.meta["design"]))
    run_jobs(todo, settings, work, name="fidelity", on_event=on_event)
    derive(every)
    return analyse(settings, designs, [read(j.result) or {**j.meta, "key": j.key, "status": "missing"} for j in every])


# ---- report -------------------------------------------------------------------------------------

LABELS = {"val_loss": "val loss", "fid": "FID", "kid": "KID", "val_loss_low_t": "val loss, t < 0.5",
          "val_loss_high_t": "val loss, t > 0.5", "train_loss_4x": "train loss at 4x steps",
          "fid_randconv": "FID (randconv)", "kid_randconv": "KID (randconv)"}


def _f(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _steps(v) -> str:
    return "-" if not v else f"{v[0]} of {v[1]}"


def _ci(v) -> str:
    return "-" if not v else f"[{v[0]:.2f}, {v[1]:.2f}]"


def markdown(a: dict, settings: FidelitySettings, command: str) -> str:
    proxies = {p.name: p for p in settings.proxies()}
    presets_used, reference = list(proxies), a["reference"]
    d = settings.data
    lines = ["# Proxy fidelity: does a cheap proxy rank designs like a long training?", "",
             f"{len(a['designs'])} designs (the {sum(n.startswith('L') for n in a['designs'])} rows of "
             f"`{Path(settings.ladder).name}` and {settings.space_samples} seeded samples of "
             f"`{Path(settings.space).name}`), each trained with every proxy preset ({a['seeds']} seeds) and with the "
             f"`{reference}` preset ({a['reference_seeds']} seed{'s' if a['reference_seeds'] > 1 else ''}, seeds of its "
             f"own), on `{Path(d['spec']).name}` ({d.get('classes') or 'all'} classes, {d.get('per_class') or 'all'} "
             f"train / {d.get('val_per_class') or 'all'} validation images per class). Every ranking is of the "
             "designs' mean score over the seeds every design has; lower is better for every score."
             + "".join(f" **`{p}` is ranked on {e['scores']['val_loss']['seeds_ranked']} of its {a['seeds']} seeds so "
                       "far** (the rest are listed at the end; the same command trains them)."
                       for p, e in a["presets"].items() if p != reference
                       and e["scores"]["val_loss"].get("seeds_ranked", a["seeds"]) < a["seeds"])
             + ("" if a["presets"][reference]["trainings"] >= len(a["designs"]) else
                f" **{a['presets'][reference]['trainings']} of the {len(a['designs'])} designs have their reference "
                "training so far**: every tau below is over those; the rest are listed at the end and the same "
                "command trains them."), "",
             "Regenerate (trains only what `reports/proxy_fidelity/results/` lacks):", "", "```", command, "```", "",
             "## Presets", "", "| preset | image px | width | steps x batch | training images | lr | val images | "
             "samples (Euler steps) | FID extractor | hardware | CPU-minutes per training |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in presets_used:
        pr, e = proxies[p], a["presets"][p]
        t = pr.train_config()
        ext = ", ".join(e["extractors"]) or t.fid_extractor
        lr = f"{t.lr:g}" + ("" if t.lr_schedule == "constant" else f", {t.lr_schedule}")
        lines.append(f"| `{p}` | {pr.image_size} | x{t.width_mult} | {t.steps} x {t.batch} | {pr.compute:,} | {lr} | "
                     f"{t.val_images} | {t.samples} ({t.sample_steps}) | {ext} | {', '.join(e['hardware']) or '-'} | "
                     f"{_f(e['cpu_minutes_per_design'], '.1f')} |")
    lines += ["", "CPU-minutes: median over the preset's trainings of (training + scoring seconds) x torch threads; each "
              "ran with 1 thread, 2 at a time on the 2-core machine (so each minute is one core's minute, with the "
              "other core busy). A training that shared the machine with other work (a test run, a search) reads slower: "
              "these are upper bounds, not speed measurements.", "",
              "## Rank fidelity against the reference", "",
              "Kendall tau and Spearman rho between the preset's ranking and the reference's ranking by the same score, "
              "with 95% bootstrap intervals over designs; `tau vs ref val loss` ranks against the reference's "
              "validation loss instead (SnapGen++'s proxy metric, the least noisy reference score). Noise / spread: "
              "the seed noise a ranking over shared seeds sees (the design x seed interaction: what is left of a "
              "design's seed-to-seed variation once the seed's effect common to all designs is removed, since seed k "
              "gives every design the same batches, noise and shared initial weights) over the spread of the designs' "
              "true means (the std of the means less what that noise puts there); under 1, designs differ by more than "
              "a seed does; `noise only`: seed noise explains all of the spread. The raw seed-to-seed std is in the "
              "JSON (`noise`). Tells apart: about how many designs the score can put in a "
              "sure order across its range at this many seeds. Seed vs seed tau: Kendall tau between two single seeds' "
              "rankings, averaged over pairs of seeds: how reproducible the preset's ranking is, whatever the reference "
              "says (high here but low against the reference: the proxy ranks another way than the long training, "
              "not by noise). Each seed's tau: Kendall tau of one seed's ranking against the reference, seed by seed "
              "(seed k gives every preset with the same batch the same batches, noise and initial weights, so a "
              "preset ranked on fewer seeds compares with another seed for seed). Ladder tau vs paper: Kendall tau of the ladder rows' ranking against the paper's FID "
              "(8 rows). Ladder steps as reference: of the ladder's row-to-row changes, how many go the same way "
              "under the preset (mean over seeds) as under the reference: the ablation report's question, asked of "
              "the proxy.", "",
              "| preset | score | Kendall tau [95% CI] | each seed's tau | Spearman rho | tau vs ref val loss | "
              "seed vs seed tau | noise / spread | tells apart | ladder steps as reference | ladder tau vs paper FID |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in presets_used:
        for s in ALL_SCORES:
            e = a["presets"][p]["scores"][s]
            tau = "1 (itself)" if p == reference else f"{_f(e.get('kendall_tau'))} {_ci(e.get('kendall_tau_ci'))}"
            nts = "noise only" if e.get("reliability") == 0 else _f(e.get("noise_to_spread"))
            each = ", ".join(_f(v) for v in e.get("kendall_tau_per_seed") or []) or "-"
            lines.append(f"| `{p}` | {LABELS[s]} | {tau} | {each} | {_f(e.get('spearman_rho'))} | "
                         f"{_f(e.get('kendall_tau_vs_reference_val_loss'))} | {_f(e.get('seed_vs_seed_tau'))} | {nts} | "
                         f"{_f(e.get('distinguishable'), '.1f')} | {_steps(e.get('ladder_steps_as_reference'))} | "
                         f"{_f(e.get('ladder_kendall_tau_vs_paper_fid'))} |")
    dflt = a["presets"][settings.default_preset]["scores"]["val_loss"]
    lines += ["", "Derived scores, computed after training from what each run kept (no retraining): the validation "
              "loss at its 4 low (t < 0.5, near the data) and 4 high (t > 0.5, near the noise) timesteps; its smoothed "
              "training loss, logged every 25 steps, fitted with a + b (s / S)^-c and read at 4x its steps S (a "
              "learning-curve extrapolation: does the curve's shape say where a longer training ends?); and FID / KID "
              "of the run's own samples with the small fixed `randconv` extractor instead of Inception."]
    lines += ["", f"The default CPU preset `{settings.default_preset}` ranks by validation loss with Kendall tau "
              f"{_f(dflt.get('kendall_tau'))} {_ci(dflt.get('kendall_tau_ci'))} against the reference "
              f"(target: 0.7)."] + _limits(a, settings) + ["", "![fidelity](proxy_fidelity.png)", "",
              "## Per design", "", "Mean score over seeds (validation loss).", "",
              "| design | " + " | ".join(f"`{p}`" for p in presets_used) + " |", "|---|" + "---|" * len(presets_used)]
    for n in a["designs"]:
        lines.append(f"| {n} | " + " | ".join(_f(a["presets"][p]["scores"]["val_loss"]["means"].get(n), ".4f")
                                              for p in presets_used) + " |")
    if a["missing"]:
        lines += ["", f"Not finished ({len(a['missing'])} trainings): " + ", ".join(a["missing"][:20])
                  + (" ..." if len(a["missing"]) > 20 else "")]
    lines += ["", "## Hardware", "", "- " + "; ".join(f"`{p}`: {', '.join(a['presets'][p]['hardware']) or '-'}"
                                                      for p in presets_used), ""]
    return "\n".join(lines) + "\n"


def _limits(a: dict, settings: FidelitySettings) -> list[str]:
    """The best tau any preset and score reached, and, under the target, what limits the default preset:
    its own seed noise (its K-seed means are not reproducible: more seeds), or, when they are, a ranking
    that differs from the reference's: the designs that move most between the two rankings, and whether
    the reference's own seed noise can be told from a proxy that orders designs differently."""
    ranked = [(e["scores"][s]["kendall_tau"], p, s) for p, e in a["presets"].items() if p != a["reference"]
              for s in ALL_SCORES if e["scores"].get(s, {}).get("kendall_tau") is not None]
    if not ranked:
        return []
    tau, p, s = max(ranked)
    out = [f"The highest tau against the reference of any preset and score: {tau:.2f} (`{p}`, {LABELS[s]})."]
    d = a["presets"][settings.default_preset]["scores"]["val_loss"]
    t, st, rel = d.get("kendall_tau"), d.get("seed_vs_seed_tau"), d.get("reliability")
    if t is None or t >= 0.7 or st is None:
        return [""] + out
    name = f"`{settings.default_preset}`"
    if rel is None or rel < 0.9:
        why = (f"its own seed noise: one seed's ranking reproduces another's at tau {st:.2f} and its "
               f"{d.get('seeds', 0):.0f}-seed means are {'not measurably' if rel is None else f'{rel:.0%}'} reliable; "
               "more seeds per design narrow it")
    else:
        moved = [m for m in _rank_moves(d["means"], a["presets"][a["reference"]]["scores"]["val_loss"]["means"])
                 if m[1] != m[2]]
        why = (f"not its own seed noise: its {d['seeds']:.0f}-seed means are {rel:.0%} reliable (one seed's ranking "
               f"reproduces another's at tau {st:.2f}), so the reference orders some designs differently. Most moved "
               "(rank by the preset -> by the reference, of " + str(len(d["means"])) + "): "
               + ", ".join(f"{n} {r1} -> {r2}" for n, r1, r2 in moved[:4])
               + ("" if (a.get("reference_noise") or {}).get("kendall_tau") is not None else
                  ". Either the designs learn at different speeds (then a longer proxy is the lever) or the reference, "
                  "one seed of its own, is itself noisy at this spread (then more reference seeds are); a second "
                  "reference seed tells which"))
    out.append(f"Under the target, what limits {name}: {why}.")
    noise = a.get("reference_noise") or {}
    if noise.get("kendall_tau") is not None:
        vs = noise.get("default_preset_vs_each_seed") or [None, None]
        out.append(f"The reference's own first two seeds rank the {noise['designs']} designs that have both at tau "
                   f"{noise['kendall_tau']:.2f} (validation loss); on those designs {name} ranks at tau "
                   f"{_f(vs[0])} and {_f(vs[1])} against each reference seed alone."
                   + (" The reference is itself noisy at this spread: no proxy can be expected to rank closer to one "
                      "reference seed than the other seed does, so the reference's mean over seeds is the target to "
                      "rank against." if noise["kendall_tau"] < 0.7 else
                      " The reference reproduces itself: the proxy's lower tau is the proxy's."))
    return ["", *out]


def _rank_moves(means: dict, ref: dict) -> list[tuple[str, int, int]]:
    """(design, rank by `means`, rank by `ref`), largest move first; rank 1 = lowest score."""
    names = [n for n in means if n in ref]
    r1 = {n: i + 1 for i, n in enumerate(sorted(names, key=means.get))}
    r2 = {n: i + 1 for i, n in enumerate(sorted(names, key=ref.get))}
    return sorted(((n, r1[n], r2[n]) for n in names), key=lambda x: (-abs(x[1] - x[2]), x[0]))


def plot(a: dict, settings: FidelitySettings, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from archlab.io import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for k, s in enumerate(SCORES):
        xs, ys, lo, hi, names = [], [], [], [], []
        for p in a["presets"]:
            if p == a["reference"]:
                continue
            e = a["presets"][p]
            sc = e["scores"][s]
            if sc.get("kendall_tau") is None or e["cpu_minutes_per_design"] is None:
                continue
            names.append(p)
            xs.append(e["cpu_minutes_per_design"])
            ys.append(sc["kendall_tau"])
            ci = sc.get("kendall_tau_ci") or [sc["kendall_tau"]] * 2
            lo.append(sc["kendall_tau"] - ci[0])
            hi.append(ci[1] - sc["kendall_tau"])
        ax1.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=f"C{k}", label=LABELS[s], capsize=3)
        for x, y, p in zip(xs, ys, names):
            ax1.annotate(p, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax1.axhline(0.7, color="0.6", ls="--", lw=0.8)
    if any(line.get_xdata().size for line in ax1.get_lines()[:-1]):
        ax1.set_xscale("log")
    ax1.set_xlabel("CPU-minutes per training")
    ax1.set_ylabel("Kendall tau vs reference")
    ax1.legend(frameon=False, fontsize=8)
    ref = a["presets"][a["reference"]]["scores"]["val_loss"]["means"]
    dflt = a["presets"][settings.default_preset]["scores"]["val_loss"]["means"]
    names = [n for n in a["designs"] if n in ref and n in dflt]
    ax2.scatter([dflt[n] for n in names], [ref[n] for n in names], s=16,
                c=["C3" if n.startswith("L") else "C0" for n in names])
    for n in names:
        ax2.annotate(n.split("-")[0], (dflt[n], ref[n]), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax2.set_xlabel(f"val loss, {settings.default_preset} preset (mean over seeds)")
    ax2.set_ylabel(f"val loss, {a['reference']}")
    ax2.set_title("ladder rows (red) and space samples (blue)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def write_report(a: dict, settings: FidelitySettings, out: str | Path, command: str) -> list[Path]:
    out = Path(out)
    js = write_atomic(out / "proxy_fidelity.json", json.dumps({"command": command, **a}, indent=1) + "\n")
    png = plot(a, settings, out / "proxy_fidelity.png")
    md = write_atomic(out / "proxy_fidelity.md", markdown(a, settings, command))
    return [md, js, png]
