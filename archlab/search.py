"""Architecture search, part 1: Optuna over a search space under a latency budget, and its outputs.

- `Candidates` is the define-by-run function: it suggests every parameter of the space (the same
  choices the random sampler offers), builds the ArchConfig, predicts its latency from a measured
  table and records `trial.set_constraint("latency_ms", predicted - budget)` (feasible when <= 0),
  so the sampler learns the feasible region.
- `BudgetedOptunaSearch` is Ray Tune's `OptunaSearch` that never hands out a candidate over the
  budget: an infeasible draw is told to Optuna at once as COMPLETE with the worst possible values
  (the form TPE and NSGA-II learn from; their objective values are never used) and marked
  `rejected`, and the next draw is tried. After `max_rejections` draws in a row it finishes the
  search with a message instead of spinning.
- `trials_frame`, `pareto_front`, `pareto_plot`, `export_best` and `summary` turn a study into the
  outputs (trials CSV/Parquet, Pareto PNG, best configs as YAML, Markdown summary).

The Ray Tune driver (trainable, scheduler, resume) builds on these; see docs/search-notes.md.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from archlab.cluster import TrialSettings, init_ray
from archlab.errors import ArchlabError
from archlab.io import atomic_path, write_atomic
from archlab.space import SearchSpace, load_space

log = logging.getLogger(__name__)

OBJECTIVES = ("val_loss", "fid", "kid")
SAMPLERS = ("tpe", "nsga2", "random")
LATENCY = "predicted_ms"
LATENCY_FLAG = "latency_flag"  # set when the prediction leaves what the table covers
INTERRUPTED = "interrupted: the search stopped before Ray recorded this trial"


def suggest_point(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """One value per parameter of the space, suggested by the trial (define-by-run)."""
    point = {}
    for p in space.params:
        if p.int_range:
            low, high, step = p.int_range
            point[p.path] = trial.suggest_int(p.path, low, high, step=step)
        else:
            point[p.path] = trial.suggest_categorical(p.path, list(p.choices))
    return point


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":  # multivariate + group: the space's parameters interact (a stage's choices together)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ArchlabError(f"--sampler: {name!r} is not one of {', '.join(SAMPLERS)}")


class Candidates:
    """The define-by-run function: point -> config -> predicted latency -> constraint.

    Picklable (Ray pickles the searcher): it holds paths and loads the space and predictor lazily.
    """

    def __init__(self, space: str | Path, table: str | Path, budget_ms: float):
        if not budget_ms > 0:
            raise ArchlabError(f"--budget-ms: must be positive, got {budget_ms}")
        self.space_path, self.table, self.budget_ms = str(space), str(table), float(budget_ms)
        self._space = self._pred = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_space": None, "_pred": None}

    @property
    def space(self) -> SearchSpace:
        if self._space is None:
            self._space = load_space(self.space_path)
        return self._space

    @property
    def predictor(self):
        if self._pred is None:
            from archlab.latency.predictor import load_for_table

            self._pred = load_for_table(self.table)
            res = self._pred.resolution
            if self.space.base.latent.resolution != res:
                self._space = self.space.at_resolution(res)
        return self._pred

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        point = suggest_point(trial, self.space)
        cfg = self.space.config(point)
        p = self.predictor.predict(cfg)
        ms = p.latency_ms
        trial.set_user_attr(LATENCY, ms)
        if p.extrapolated:  # the table does not cover this candidate: its latency is a guess, and says so
            trial.set_user_attr(LATENCY_FLAG, "outside calibration" if p.outside_calibration else "extrapolated")
        trial.set_constraint("latency_ms", ms - self.budget_ms)
        return {LATENCY: ms, "optuna_trial": trial.number}


def _searcher_base():
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class BudgetedOptunaSearch(_searcher_base()):
    """OptunaSearch that rejects candidates over the latency budget before any training."""

    def __init__(self, *args, max_rejections: int = 2000, **kwargs):
        self._max_rejections = max_rejections
        super().__init__(*args, **kwargs)

    def _worst(self):
        modes = self._mode if isinstance(self._mode, list) else [self._mode]
        values = [math.inf if m == "min" else -math.inf for m in modes]
        return values if len(values) > 1 else values[0]

    def suggest(self, trial_id: str):
        from ray.tune.search import Searcher
        from ray.tune.utils.util import unflatten_dict

        if trial_id in self._ot_trials:  # asked again about a trial it already handed out
            return super().suggest(trial_id)
        for _ in range(self._max_rejections):
            ot_trial = self._ot_study.ask()
            try:
                params = self._suggest_from_define_by_run_func(self._space, ot_trial)
            except Exception:
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
                raise
            if all(v <= 0 for v in ot_trial.constraints.values()):
                self._ot_trials[trial_id] = ot_trial
                return unflatten_dict(params)
            ot_trial.set_user_attr("rejected", True)
            self._ot_study.tell(ot_trial, self._worst(), state=TrialState.COMPLETE)
        log.error("no candidate within the latency budget in %d draws in a row: stopping the search",
                  self._max_rejections)
        return Searcher.FINISHED

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        close_interrupted(self._ot_study, live={t._trial_id for tid, t in self._ot_trials.items()
                                                 if tid not in self._completed_trials})

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate reports are for the scheduler (ASHA); Optuna gets the final scores only."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in names] if result else None
        if error:
            state, values = TrialState.FAIL, None
        elif values is None or any(v is None or v != v for v in values):  # stopped early, or NaN
            state, values = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        self._ot_study.tell(ot_trial, values if values is None or len(values) > 1 else values[0], state=state,
                            skip_if_finished=True)
        self._completed_trials.add(trial_id)


def close_interrupted(study: optuna.Study, live: set[int] = frozenset()) -> int:
    """After a crash: Optuna trials still RUNNING that Ray will not run again (created after its last
    checkpoint) would stay RUNNING forever and bias TPE; close them as failed, `interrupted`.
    `live`: storage ids of the trials Ray restores. Returns how many were closed."""
    closed = 0
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if ft._trial_id not in live:
            optuna.trial.Trial(study, ft._trial_id).set_user_attr("reason", INTERRUPTED)
            study.tell(ft.number, state=TrialState.FAIL, skip_if_finished=True)
            closed += 1
    return closed


def finished(study: optuna.Study) -> int:
    """Trials that count toward the total: trained, stopped early or failed (not rejected, not interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
               if not t.user_attrs.get("rejected") and t.user_attrs.get("reason") != INTERRUPTED)


# ---- outputs ------------------------------------------------------------------------------------

def trials_frame(study: optuna.Study, objectives: list[str]):
    """One row per trial: number, state, rejected, predicted latency, objectives, params, times."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rejected = bool(t.user_attrs.get("rejected"))
        values = t.values if (t.values and not rejected) else [None] * len(objectives)
        row = {"number": t.number, "state": "REJECTED" if rejected else t.state.name, LATENCY: t.user_attrs.get(LATENCY),
               LATENCY_FLAG: t.user_attrs.get(LATENCY_FLAG, ""),
               **{o: v for o, v in zip(objectives, values)},
               "status": t.user_attrs.get("status", ""), "reason": t.user_attrs.get("reason", ""),
               "started": t.datetime_start, "completed": t.datetime_complete,
               "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
               if t.datetime_complete and t.datetime_start else None}
        row.update({f"param.{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_front(df, objective: str):
    """Trained trials not dominated in (objective, predicted latency), both minimised."""
    done = df[(df["state"] == "COMPLETE") & df[objective].notna()].sort_values([LATENCY, objective])
    front, best = [], math.inf
    for i, r in done.iterrows():
        if r[objective] < best:
            front.append(i)
            best = r[objective]
    return done.loc[front]


def pareto_plot(df, objective: str, budget_ms: float, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = df[(df["state"] == "COMPLETE") & df[objective].notna()]
    front = pareto_front(df, objective)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter(done[LATENCY], done[objective], s=18, color="0.6", label="trained trials")
    ax.plot(front[LATENCY], front[objective], "o-", color="C3", label="Pareto front")
    ax.axvline(budget_ms, color="C0", ls="--", lw=1, label=f"budget {budget_ms:g} ms")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel(objective)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)


def export_best(df, space: SearchSpace, objective: str, out_dir: str | Path, k: int = 3) -> list[Path]:
    """The k best trained trials by `objective` as ArchConfig YAML files (for cost, latency query, train)."""
    done = df[(df["state"] == "COMPLETE") & df[objective].notna()].sort_values(objective).head(k)
    paths = []
    for rank, (_, r) in enumerate(done.iterrows(), 1):
        point = space.point_from({c[len("param."):]: r[c] for c in df.columns if c.startswith("param.")})
        cfg = space.config(point, name=f"{space.name}-trial{int(r['number'])}")
        header = (f"# trial {int(r['number'])}: {objective} {r[objective]:.4g}, predicted {r[LATENCY]:.1f} ms "
                  f"(rank {rank} of the trained trials)\n")
        paths.append(write_atomic(Path(out_dir) / f"best-{rank}.yaml", header + cfg.to_yaml()))
    return paths


def counts(df) -> dict[str, int]:
    states = df["state"].value_counts().to_dict()
    interrupted = int(((df["state"] == "FAIL") & (df["reason"] == INTERRUPTED)).sum())
    return {"sampled": int(len(df)), "rejected_over_budget": int(states.get("REJECTED", 0)),
            "trained": int(states.get("COMPLETE", 0)), "stopped_early": int(states.get("PRUNED", 0)),
            "failed": int(states.get("FAIL", 0)) - interrupted, "interrupted": interrupted,
            "running": int(states.get("RUNNING", 0))}


# ---- the Ray Tune driver ------------------------------------------------------------------------

@dataclass
class SearchSettings(TrialSettings):
    """Everything a search needs; saved as `search.json` in its run folder, so `--resume` needs nothing else."""
    space: str
    table: str
    budget_ms: float
    trials: int = 6
    objective: str = "val_loss"
    multi: bool = False  # objectives (quality, predicted latency) instead of quality under the budget
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None  # Optuna storage URL; default: a journal file in the run folder
    asha: bool = True
    max_rejections: int = 2000
    max_failed_share: float = 0.5

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ArchlabError(f"--objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        make_sampler(self.sampler, self.seed)
        for name, ok in (("trials", self.trials >= 1), ("budget_ms", self.budget_ms > 0),
                         ("max_failed_share", 0 < self.max_failed_share <= 1)):
            if not ok:
                raise ArchlabError(f"--{name.replace('_', '-')}: {getattr(self, name)!r} is out of range")
        if self.objective != "val_loss" and not self.train_config.samples:
            raise ArchlabError(f"--objective {self.objective} needs generated images: --samples must be > 0")
        self.validate_trials()

    @property
    def metrics(self) -> list[str]:
        return [self.objective, LATENCY] if self.multi else [self.objective]


def read_settings(path: Path) -> SearchSettings:
    """The settings a search saved in its run folder, checked; a damaged file is a one-line error
    naming it, and nothing in the folder changes."""
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}, not an object")
        settings = SearchSettings(**raw)
        settings.validate()
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ArchlabError(f"{path}: not a readable search settings file ({str(e).splitlines()[0][:160]}); "
                           "start a new search in another folder") from None
    return settings


def _trial(config: dict, settings: dict, run_dir: str) -> None:
    """One Ray Tune trial: train the candidate at proxy scale, report the train loss as it goes and
    the scores at the end. A diverged run raises, so Tune records it as failed with the reason.

    The scores are also written to the Optuna trial (user attr `scores`) before they are reported:
    if Ray runs a finished trial again after a crash of the driver, it reports them without training."""
    import torch
    from ray import tune

    from archlab.data import load_dataset
    from archlab.train import train

    s = SearchSettings(**settings)
    study = optuna.load_study(study_name=Path(run_dir).name, storage=_storage(s, Path(run_dir)))
    frozen = study.trials[config["optuna_trial"]]
    if "scores" in frozen.user_attrs:
        tune.report(frozen.user_attrs["scores"])
        return
    torch.set_num_threads(s.cpus_per_trial)
    space = load_space(s.space)
    point = {p.path: config[p.path] for p in space.params}
    cfg = space.config(point, name=f"{space.name}-{tune.get_context().get_trial_id()}")
    data = load_dataset(s.data_config)
    out = Path(tune.get_context().get_trial_dir()) / "proxy"  # its checkpoint: a resumed trial continues

    def report(step: int, metrics: dict) -> None:
        tune.report({"train_loss": metrics["train_loss"], "step": step})

    r = train(cfg, data, s.train_config, out=out, on_report=report, with_scores=True)
    if r.status != "ok":
        raise RuntimeError(f"{r.status}: {r.reason}")
    scores = {"train_loss": r.train_loss, "step": r.steps, "val_loss": r.val_loss, "fid": r.fid, "kid": r.kid,
              LATENCY: config[LATENCY], "fid_extractor": r.fid_extractor or "", "seconds": r.seconds}
    optuna.trial.Trial(study, frozen._trial_id).set_user_attr("scores", scores)
    tune.report(scores)


class _FailureGuard:
    """Stops the search when most trials fail (at least 3), instead of burning the budget."""

    def __init__(self, share: float):
        self.share, self.failed, self.done, self.message = share, 0, 0, ""

    def callback(self):
        from ray.tune import Callback

        guard = self

        class _Count(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                guard.done += 1

            def on_trial_error(self, iteration, trials, trial, **info):
                guard.done += 1
                guard.failed += 1
                if guard.failed >= 3 and guard.failed > guard.share * guard.done:
                    guard.message = (f"{guard.failed} of {guard.done} trials failed (see their error.txt in the "
                                     "run folder): stopping the search")

        return _Count()

    def stopper(self):
        from ray.tune.stopper import Stopper

        guard = self

        class _Stop(Stopper):
            def __call__(self, trial_id, result):
                return False

            def stop_all(self):
                return bool(guard.message)

        return _Stop()


def _storage(settings: SearchSettings, run_dir: Path):
    if settings.storage:  # an RDB URL (sqlite:///..., postgresql://...)
        try:
            return optuna.storages.RDBStorage(settings.storage)
        except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a server that does not answer
            raise ArchlabError(f"--storage: cannot open {settings.storage!r}: {str(e).splitlines()[0][:200]}") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))


def run_search(settings: SearchSettings | None, run_dir: str | Path, resume: bool = False) -> dict:
    """Run (or resume) a search in `run_dir`; writes the outputs there and returns the summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from archlab.train import prepare

    run_dir = Path(run_dir).resolve()
    saved = run_dir / "search.json"
    if resume:
        if not saved.is_file():
            raise ArchlabError(f"--resume: {run_dir} is not a search run folder (no search.json)")
        settings = read_settings(saved)
    elif saved.exists():
        raise ArchlabError(f"--out: {run_dir} already holds a search: resume it with --resume {run_dir}, or pick another folder")
    else:  # trials run in their own folders (and maybe other machines): absolute paths only
        settings.space, settings.table = str(Path(settings.space).resolve()), str(Path(settings.table).resolve())
        if settings.data["spec"] != "synthetic":
            settings.data = {**settings.data, "spec": str(Path(settings.data["spec"]).resolve())}
    settings.validate()
    candidates = Candidates(settings.space, settings.table, settings.budget_ms)
    candidates.predictor  # a missing or stale table fails now
    prepare(settings.data_config, settings.train_config)
    if not resume:
        write_atomic(saved, json.dumps(asdict(settings), indent=1) + "\n")

    init_ray(settings.address)
    t = settings.train_config
    trainable = tune.with_resources(tune.with_parameters(_trial, settings=asdict(settings), run_dir=str(run_dir)),
                                    settings.resources)
    exp = run_dir / "ray" / "search"
    guard = _FailureGuard(settings.max_failed_share)
    restorable = resume and tune.Tuner.can_restore(str(exp))
    remaining = settings.trials
    if resume and not restorable:  # killed before Ray's first checkpoint (or before the study existed)
        try:
            study = optuna.load_study(study_name=run_dir.name, storage=_storage(settings, run_dir))
        except KeyError:
            study = None
        if study is not None:
            close_interrupted(study)
            remaining = settings.trials - finished(study)
    if restorable:
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=False)
    elif remaining <= 0:
        tuner = None
    else:
        modes = ["min"] * len(settings.metrics)
        searcher = BudgetedOptunaSearch(space=candidates, metric=settings.metrics if settings.multi else settings.objective,
                                        mode=modes if settings.multi else "min", sampler=make_sampler(settings.sampler, settings.seed),
                                        storage=_storage(settings, run_dir), study_name=run_dir.name,
                                        max_rejections=settings.max_rejections)
        scheduler = None
        iterations = len({*range(t.report_every, t.steps + 1, t.report_every), t.steps}) + 1  # + the final scores
        if settings.asha and iterations > 3:  # fewer reports than that leave nothing to stop on
            scheduler = ASHAScheduler(time_attr="training_iteration", metric="train_loss", mode="min",
                                      max_t=iterations, grace_period=max(2, iterations // 4), reduction_factor=3)
        tuner = tune.Tuner(trainable,
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                                                       max_concurrent_trials=settings.concurrency),
                           run_config=tune.RunConfig(name="search", storage_path=str(run_dir / "ray"), verbose=1,
                                                     callbacks=[guard.callback()], stop=guard.stopper()))
    grid = tuner.fit() if tuner else []
    errors = {}
    for r in grid:
        if r.error is not None and r.config:
            errors[r.config.get("optuna_trial")] = str(r.error).strip().splitlines()[-1][:300]
    summary = write_outputs(settings, run_dir, errors)
    if guard.message:
        summary["stopped"] = guard.message
    return summary


def write_outputs(settings: SearchSettings, run_dir: Path, errors: dict | None = None) -> dict:
    """trials.csv/.parquet, pareto.png, best/*.yaml and summary.md from the run's Optuna study."""
    study = optuna.load_study(study_name=run_dir.name, storage=_storage(settings, run_dir))
    df = trials_frame(study, settings.metrics)
    for number, reason in (errors or {}).items():
        df.loc[df["number"] == number, "reason"] = reason
    trained = df[df["state"] == "COMPLETE"]
    over = trained[trained[LATENCY] > settings.budget_ms]
    if len(over):  # cannot happen: the searcher rejects them; say so loudly if it ever does
        raise ArchlabError(f"trials {list(over['number'])} were trained over the budget")
    with atomic_path(run_dir / "trials.csv") as tmp:
        df.to_csv(tmp, index=False)
    mixed = [c for c in df.columns if c.startswith("param.") and df[c].map(type).nunique() > 1]
    with atomic_path(run_dir / "trials.parquet") as tmp:
        df.astype({c: str for c in mixed}).to_parquet(tmp, index=False)  # kv_heads: 2 or "mqa"
    n = counts(df)
    summary = {"run_dir": str(run_dir), "settings": asdict(settings), **n}
    if len(trained):
        pareto_plot(df, settings.objective, settings.budget_ms, run_dir / "pareto.png")
        best = export_best(df, load_space(settings.space).at_resolution(Candidates(
            settings.space, settings.table, settings.budget_ms).predictor.resolution), settings.objective, run_dir / "best")
        top = trained.sort_values(settings.objective).iloc[0]
        summary["best"] = {"trial": int(top["number"]), settings.objective: float(top[settings.objective]),
                           LATENCY: float(top[LATENCY]), "config": str(best[0])}
    write_atomic(run_dir / "summary.md", summary_markdown(summary, df, settings))
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def summary_markdown(summary: dict, df, settings: SearchSettings) -> str:
    o = settings.objective
    lines = [f"# Search `{Path(summary['run_dir']).name}`", "",
             f"Space `{settings.space}`, budget {settings.budget_ms:g} ms predicted on `{settings.table}`, "
             f"objective `{o}`{' and predicted latency (multi-objective)' if settings.multi else ''}, sampler "
             f"`{settings.sampler}` (seed {settings.seed}), dataset `{settings.data['spec']}`, {settings.train['steps']} "
             f"steps per trial at width x{settings.train['width_mult']}.", "",
             f"- candidates sampled: {summary['sampled']}; rejected over the budget before training: "
             f"{summary['rejected_over_budget']}",
             f"- trained to the end: {summary['trained']}; stopped early by ASHA: {summary['stopped_early']}; "
             f"failed: {summary['failed']}; interrupted (and sampled again on resume): {summary['interrupted']}"]
    if "best" in summary:
        b = summary["best"]
        lines += [f"- best: trial {b['trial']}, {o} {b[o]:.4g}, predicted {b[LATENCY]:.1f} ms -> `{b['config']}`", "",
                  "![Pareto front](pareto.png)", ""]
    failed = df[(df["state"] == "FAIL") & (df["reason"] != INTERRUPTED)]
    if len(failed):
        lines += ["", "Failed trials:", ""] + [f"- trial {int(r['number'])}: {r['reason'] or 'see its error.txt'}"
                                              for _, r in failed.iterrows()]
    return "\n".join(lines) + "\n"
