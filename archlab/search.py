"""Architecture search: Optuna proposes, the latency predictor rejects, the trials engine trains.

- `Candidates.propose(trial)` suggests every parameter of the space on an Optuna trial (the same
  choices the random sampler offers), builds the ArchConfig, predicts its latency from a measured
  table and records `trial.set_constraint("latency_ms", predicted - budget)` (feasible when <= 0).
- `Proposer` is a Ray Tune `Searcher` (its public interface) over Optuna's public ask -> tell: it
  hands Ray one trials-engine job per candidate within the budget. A candidate over the budget is
  told to Optuna at once as PRUNED (never trained; user attr `rejected`), before any job exists:
  samplers learn from its constraint (TPE ranks infeasible trials by their violation, whatever their
  state), and in optuna-dashboard it is not mistaken for a trained trial. The training loss reaches
  the Optuna trial as intermediate values (learning curves); the end of a job is told as COMPLETE
  (its scores), FAIL (diverged or raised, with the reason) or PRUNED (stopped early by ASHA).
- `run_search` runs or resumes a search in its run folder. The Optuna study (a journal file) is the
  record: on `--resume`, a candidate that was being trained is trained again from its checkpoint
  (its job's folder), one whose result was written is told, and new candidates make up the rest.
- `trials_frame`, `pareto_front`, `pareto_plot`, `export_best` and `summary` turn a study into the
  outputs (trials CSV/Parquet, Pareto PNG, best configs as YAML, Markdown summary).

Only public APIs of Optuna and Ray Tune are used; see docs/search-notes.md for what was learnt.
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

from archlab.cluster import TrialSettings
from archlab.errors import ArchlabError
from archlab.io import atomic_path, folder_lock, write_atomic
from archlab.schema import at_least, build, positive, setting
from archlab.space import SearchSpace, load_space

log = logging.getLogger(__name__)

OBJECTIVES = ("val_loss", "fid", "kid")
EVALUATORS = ("train", "supernet")
INHERITED = "inherited_val_loss"  # the user attribute of a candidate scored with a supernet's weights
SAMPLERS = ("tpe", "nsga2", "random")
LATENCY = "predicted_ms"
LATENCY_FLAG = "latency_flag"  # set when the prediction leaves what the table covers
INTERRUPTED = "interrupted: the search stopped while this candidate was being drawn"


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

    def propose(self, trial: optuna.Trial):
        """Suggest a candidate on `trial`, predict its latency and record the constraint; returns
        (config, predicted ms). Over the budget when the constraint is > 0."""
        cfg = self.space.config(suggest_point(trial, self.space), name=f"{self.space.name}-trial{trial.number}")
        p = self.predictor.predict(cfg)
        trial.set_user_attr(LATENCY, p.latency_ms)
        trial.set_user_attr("budget_ms", self.budget_ms)  # the constraint, where optuna-dashboard shows it
        if p.extrapolated:  # the table does not cover this candidate: its latency is a guess, and says so
            trial.set_user_attr(LATENCY_FLAG, "outside calibration" if p.outside_calibration else "extrapolated")
        trial.set_constraint("latency_ms", p.latency_ms - self.budget_ms)
        return cfg, p.latency_ms


def _proposer_base():
    from ray.tune.search import Searcher

    return Searcher


class Proposer(_proposer_base()):
    """Ray Tune's searcher interface over Optuna's public ask/tell, handing out trials-engine jobs.

    `job_for(number, config, meta)` makes the job of Optuna trial `number`; `pending` are (number, job)
    of trials to train again first (a resumed search). `on_event(kind, info)` hears of rejections."""

    def __init__(self, study: optuna.Study, candidates: Candidates, job_for, objectives: list[str], cluster,
                 pending=(), max_rejections: int = 2000, max_failed_share: float = 0.5, on_event=None):
        super().__init__()
        self.study, self.candidates, self.job_for, self.objectives = study, candidates, job_for, objectives
        self._cluster = cluster  # a TrialSettings: the threads a job's trial gets
        self.pending, self.max_rejections, self.max_failed_share = list(pending), max_rejections, max_failed_share
        self.on_event = on_event or (lambda kind, info: None)
        self.live: dict[str, tuple[int, Any, optuna.Trial | None]] = {}  # Ray trial id -> (number, job, trial)
        self.finished = self.failed = 0
        self.message = ""

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the candidates come from the space and the budget, not from a Tune config

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the Optuna study and the jobs' results are the search's state."""

    def restore(self, checkpoint_path: str) -> None:
        """A search resumes from its study (`run_search(..., resume=True)`), not from Ray's state."""

    def suggest(self, trial_id: str):
        from ray.tune.search import Searcher

        from archlab.trials import payload

        if self.message:
            return Searcher.FINISHED
        if self.pending:
            number, job = self.pending.pop(0)
            self.live[trial_id] = (number, job, None)
            return {"job": payload(job, self._cluster)}
        for _ in range(self.max_rejections):
            trial = self.study.ask()
            try:
                cfg, ms = self.candidates.propose(trial)
            except Exception:
                self.study.tell(trial, state=TrialState.FAIL)  # never leave a trial RUNNING
                raise
            if ms <= self.candidates.budget_ms:
                job = self.job_for(trial.number, cfg, {LATENCY: ms, LATENCY_FLAG: trial.user_attrs.get(LATENCY_FLAG, "")})
                trial.set_user_attr("job", job.key)
                self.live[trial_id] = (trial.number, job, trial)
                return {"job": payload(job, self._cluster)}
            reject(self.study, trial, ms, self.candidates.budget_ms, self.on_event)
        self.message = no_candidate(self.max_rejections)
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """The training loss as the trial's intermediate values: learning curves in optuna-dashboard."""
        _, _, trial = self.live.get(trial_id, (None, None, None))
        if trial is not None and len(self.study.directions) == 1 and "train_loss" in result and "step" in result:
            trial.report(float(result["train_loss"]), int(result["step"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from archlab.trials import read

        if trial_id not in self.live:
            return
        number, job, trial = self.live.pop(trial_id)
        result = read(job.result)
        if result is None and error:  # the trial's process died (out of memory, a lost node): not an early stop
            result = {"status": "failed", "reason": "the trial's process failed; see its error.txt under ray/"}
        state = tell(self.study, number, trial, result, self.objectives)
        Path(job.workdir, "checkpoint.pt").unlink(missing_ok=True)  # told: nothing will resume it
        self.finished += 1
        self.failed += state == TrialState.FAIL
        if self.failed >= 3 and self.failed > self.max_failed_share * self.finished:
            self.message = (f"{self.failed} of {self.finished} trials failed (their reasons are in trials.csv): "
                            "stopping the search")


def reject(study: optuna.Study, trial: optuna.Trial, ms: float, budget_ms: float, on_event) -> None:
    """Tell Optuna of a candidate over the budget, never trained: PRUNED, with the reason."""
    trial.set_user_attr("rejected", f"predicted {ms:.1f} ms > budget {budget_ms:g} ms")
    study.tell(trial, state=TrialState.PRUNED)
    on_event("rejected", {"trial": trial.number, LATENCY: ms})


def no_candidate(draws: int) -> str:
    return f"no candidate within the latency budget in {draws} draws in a row: stopping the search"


def tell(study: optuna.Study, number: int, trial: optuna.Trial | None, result: dict | None, objectives: list[str]):
    """Tell Optuna how a candidate's job ended: COMPLETE with its scores, FAIL (diverged or raised),
    or PRUNED (no result: stopped early by ASHA). Returns the state told."""
    if result is None:
        state, values = TrialState.PRUNED, None
    elif result.get("status") != "ok":
        state, values = TrialState.FAIL, None
    else:
        values = [result.get(o) for o in objectives]
        bad = any(v is None or not math.isfinite(v) for v in values)
        state, values = (TrialState.FAIL, None) if bad else (TrialState.COMPLETE, values)
    if trial is not None and state == TrialState.FAIL and result is not None:
        trial.set_user_attr("reason", f"{result.get('status')}: {result.get('reason', '')}"[:300])
    study.tell(trial if trial is not None else number, values if values is None or len(values) > 1 else values[0],
               state=state, skip_if_finished=True)
    return state


def finished(study: optuna.Study) -> int:
    """Trials that count toward the total: trained (or scored by a supernet), stopped early or failed (not
    rejected, not interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
               if not t.user_attrs.get("rejected") and ("job" in t.user_attrs or INHERITED in t.user_attrs))


# ---- outputs ------------------------------------------------------------------------------------

def trials_frame(study: optuna.Study, objectives: list[str]):
    """One row per trial: number, state, rejected, predicted latency, objectives, params, times."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rejected = bool(t.user_attrs.get("rejected"))
        values = t.values if (t.values and not rejected) else [None] * len(objectives)
        reason = t.user_attrs.get("reason", "")
        if t.state == TrialState.FAIL and "job" not in t.user_attrs and INHERITED not in t.user_attrs and not rejected:
            reason = INTERRUPTED  # closed on resume: it was being drawn when the search stopped
        row = {"number": t.number, "state": "REJECTED" if rejected else t.state.name, LATENCY: t.user_attrs.get(LATENCY),
               LATENCY_FLAG: t.user_attrs.get(LATENCY_FLAG, ""),
               **{o: v for o, v in zip(objectives, values)}, "job": t.user_attrs.get("job", ""), "reason": reason,
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
    budget_ms: float = setting(valid=positive, rule="> 0")
    trials: int = setting(6, valid=at_least(1), rule=">= 1")
    objective: str = setting("val_loss", choices=OBJECTIVES)
    multi: bool = False  # objectives (quality, predicted latency) instead of quality under the budget
    sampler: str = setting("tpe", choices=SAMPLERS)
    seed: int = 0
    storage: str | None = None  # Optuna storage URL; default: a journal file in the run folder
    asha: bool = True
    max_rejections: int = setting(2000, valid=at_least(1), rule=">= 1")
    max_failed_share: float = setting(0.5, valid=lambda v: 0 < v <= 1, rule="in (0, 1]")
    evaluator: str = setting("train", choices=EVALUATORS)  # train: a proxy training per candidate; supernet: inherited
    supernet: str | None = None  # the trained supernet folder (--evaluator supernet)
    eval_images: int = setting(128, valid=at_least(1), rule=">= 1")  # held-out images of an inherited score
    retrain: int = setting(0, valid=at_least(0), rule=">= 0")  # the best K candidates trained standalone after

    def validate(self) -> None:
        self.validate_trials()
        if self.objective != "val_loss" and not self.train_config.samples:
            raise ArchlabError(f"--objective {self.objective} needs generated images: --samples must be > 0")
        if self.evaluator == "supernet":
            if not self.supernet:
                raise ArchlabError("--supernet: required with --evaluator supernet (a folder of `archlab supernet train`)")
            if self.objective != "val_loss":
                raise ArchlabError(f"--objective {self.objective}: the supernet evaluator scores the validation loss only")
        elif self.supernet or self.retrain:
            raise ArchlabError(f"{'--supernet' if self.supernet else '--retrain'}: only with --evaluator supernet")

    @property
    def metrics(self) -> list[str]:
        return [self.objective, LATENCY] if self.multi else [self.objective]


def read_settings(path: Path) -> SearchSettings:
    """The settings a search saved in its run folder, checked; a damaged file is a one-line error
    naming it, and nothing in the folder changes."""
    try:
        settings = build(SearchSettings, json.loads(path.read_text()), str(path))
        settings.validate()
    except ArchlabError as e:
        raise ArchlabError(f"{path}: not a usable search settings file ({str(e).removeprefix(f'{path}: ')}); "
                           "start a new search in another folder") from None
    except ValueError as e:  # not JSON
        raise ArchlabError(f"{path}: not a readable search settings file ({str(e).splitlines()[0][:160]}); "
                           "start a new search in another folder") from None
    return settings


def _storage(settings: SearchSettings, run_dir: Path):
    if settings.storage:  # an RDB URL (sqlite:///..., postgresql://...)
        try:
            return optuna.storages.RDBStorage(settings.storage)
        except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a server that does not answer
            raise ArchlabError(f"--storage: cannot open {settings.storage!r}: {str(e).splitlines()[0][:200]}") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))


def _study(settings: SearchSettings, run_dir: Path, create: bool) -> optuna.Study:
    """The search's study (named after its run folder), with its metric names; `create`: make it if the
    storage lacks it (a new search, or one stopped before its study existed)."""
    sampler = make_sampler(settings.sampler, settings.seed)
    storage = _storage(settings, run_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI prints a line per trial instead
    try:
        return optuna.load_study(study_name=run_dir.name, storage=storage, sampler=sampler)
    except KeyError:
        if not create:
            raise
    study = optuna.create_study(study_name=run_dir.name, storage=storage, sampler=sampler,
                                directions=["minimize"] * len(settings.metrics))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(settings.metrics)
    return study


def open_study(run_dir: str | Path) -> optuna.Study:
    """The study of the search in `run_dir`, as far as it got (for analysis; `run_search` resumes it)."""
    run_dir = Path(run_dir)
    return _study(read_settings(run_dir / "search.json"), run_dir, create=False)


def _jobs(settings: SearchSettings, run_dir: Path):
    """The trials-engine job of Optuna trial `number`: its result in `trials/`, its checkpoint beside it."""
    from archlab.trials import Job

    def job_for(number: int, cfg, meta: dict) -> Job:
        key = f"trial{number:04d}"
        return Job(key=key, arch=cfg.to_dict(), data=settings.data, train=settings.train,
                   result=str(run_dir / "trials" / f"{key}.json"), workdir=str(run_dir / "trials" / key),
                   meta={"trial": number, **meta})

    return job_for


def _recover(study: optuna.Study, candidates: Candidates, job_for, objectives: list[str]) -> list:
    """After a stop: Optuna trials still RUNNING. One whose job wrote its result is told now; one that
    was being trained is returned (number, job) to be trained again (from its checkpoint); one that
    was being drawn (no job yet) is closed as failed: interrupted."""
    from archlab.trials import read

    space, pending = candidates.space, []
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "job" not in ft.user_attrs or any(p.path not in ft.params for p in space.params):
            study.tell(ft.number, state=TrialState.FAIL, skip_if_finished=True)
            continue
        cfg = space.config(space.point_from(ft.params), name=f"{space.name}-trial{ft.number}")
        job = job_for(ft.number, cfg, {LATENCY: ft.user_attrs.get(LATENCY), LATENCY_FLAG: ft.user_attrs.get(LATENCY_FLAG, "")})
        result = read(job.result)
        if result is not None and result.get("status") != "failed":
            tell(study, ft.number, None, result, objectives)
        else:
            pending.append((ft.number, job))
    return pending


def run_search(settings: SearchSettings | None, run_dir: str | Path, resume: bool = False, on_event=None) -> dict:
    """Run (or resume) a search in `run_dir`; writes the outputs there and returns the summary.
    `on_event(kind, info)`: a candidate rejected, scored, a trial started or ended (for progress lines).
    One run at a time holds the folder: a second is refused while the first runs."""
    run_dir = Path(run_dir).resolve()
    if resume and (run_dir / "search.json").is_file():
        read_settings(run_dir / "search.json")  # a damaged folder is refused before anything is written there
    with folder_lock(run_dir, "--resume" if resume else "--out"):
        return _run_search(settings, run_dir, resume, on_event)


def _run_search(settings: SearchSettings | None, run_dir: Path, resume: bool, on_event) -> dict:
    from archlab.train import prepare

    saved = run_dir / "search.json"
    if resume:
        if not saved.is_file():
            raise ArchlabError(f"--resume: {run_dir} is not a search run folder (no search.json)")
        settings = read_settings(saved)
    elif saved.exists():
        raise ArchlabError(f"--out: {run_dir} already holds a search: resume it with --resume {run_dir}, or pick another folder")
    else:  # trials run in their own folders (and maybe other machines): absolute paths only
        settings.space, settings.table = str(Path(settings.space).resolve()), str(Path(settings.table).resolve())
        settings.locate_data()
        if settings.supernet:
            settings.supernet = str(Path(settings.supernet).resolve())
    settings.validate()
    candidates = Candidates(settings.space, settings.table, settings.budget_ms)
    candidates.predictor  # a missing or stale table fails now
    if settings.evaluator == "train" or settings.retrain:
        prepare(settings.data_config, settings.train_config)
    if not resume:
        write_atomic(saved, json.dumps(asdict(settings), indent=1) + "\n")

    study = _study(settings, run_dir, create=True)
    emit = on_event or (lambda kind, info: None)
    search = _search_inherited if settings.evaluator == "supernet" else _search_trained
    message = search(settings, run_dir, study, candidates, emit)
    summary = write_outputs(settings, run_dir)
    if message:
        summary["stopped"] = message
    return summary


def _search_trained(settings: SearchSettings, run_dir: Path, study: optuna.Study, candidates: Candidates, emit) -> str:
    """Every candidate within the budget trained as a Ray Tune trial (the `Proposer` hands them out)."""
    from ray.tune.schedulers import ASHAScheduler

    from archlab.trials import tune_jobs

    job_for = _jobs(settings, run_dir)
    pending = _recover(study, candidates, job_for, settings.metrics)
    remaining = settings.trials - finished(study)
    proposer = Proposer(study, candidates, job_for, settings.metrics, settings, pending=pending,
                        max_rejections=settings.max_rejections, max_failed_share=settings.max_failed_share,
                        on_event=emit)
    if remaining > 0:
        t = settings.train_config
        scheduler = None
        iterations = len({*range(t.report_every, t.steps + 1, t.report_every), t.steps}) + 1  # + the final scores
        if settings.asha and iterations > 3:  # fewer reports than that leave nothing to stop on
            scheduler = ASHAScheduler(time_attr="training_iteration", metric="train_loss", mode="min",
                                      max_t=iterations, grace_period=max(2, iterations // 4), reduction_factor=3)
        tune_jobs(settings, run_dir, "search", searcher=proposer, num_samples=remaining, scheduler=scheduler,
                  on_event=lambda kind, job, info: emit(kind, {"job": job.key, **job.meta, "result": info}))
    return proposer.message


def _search_inherited(settings: SearchSettings, run_dir: Path, study: optuna.Study, candidates: Candidates, emit) -> str:
    """Every candidate within the budget scored with the supernet's weights, in this process (seconds
    each: a Ray trial per candidate would cost more than the score); then the best `retrain` candidates
    trained standalone as Ray Tune trials."""
    from archlab.supernet import Supernet

    sn = Supernet(settings.supernet, device=settings.train_config.device, threads=settings.cpus_per_trial)
    _check_same_space(sn, candidates.space, settings)
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a stop between score and tell
        value = ft.user_attrs.get(INHERITED)
        if value is None:
            study.tell(ft.number, state=TrialState.FAIL, skip_if_finished=True)
        else:
            study.tell(ft.number, [value, ft.user_attrs[LATENCY]] if settings.multi else value, skip_if_finished=True)
    rejections, done = 0, finished(study)
    while done < settings.trials:
        trial = study.ask()
        try:
            cfg, ms = candidates.propose(trial)
            if ms > settings.budget_ms:
                reject(study, trial, ms, settings.budget_ms, emit)
                rejections += 1
                if rejections >= settings.max_rejections:
                    return no_candidate(settings.max_rejections)
                continue
            rejections = 0
            score = sn.score(cfg, settings.eval_images)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)  # never leave a trial RUNNING
            raise
        value = score["val_loss"]
        trial.set_user_attr("score_seconds", round(score["seconds"], 3))
        if not math.isfinite(value):  # scored, and failed: it counts toward the total (None: no score)
            trial.set_user_attr("reason", f"non-finite inherited val_loss {value}")
            trial.set_user_attr(INHERITED, None)
            study.tell(trial, state=TrialState.FAIL)
        else:
            trial.set_user_attr(INHERITED, value)
            study.tell(trial, [value, ms] if settings.multi else value)
        done += 1
        emit("scored", {"trial": trial.number, LATENCY: ms, "val_loss": value, "seconds": score["seconds"],
                        "finished": done, "trials": settings.trials})
    if settings.retrain:
        _retrain(settings, run_dir, study, candidates.space, emit)
    return ""


def _check_same_space(sn, space: SearchSpace, settings: SearchSettings) -> None:
    """The supernet must be the one of the searched space (its choices and its fixed part)."""
    theirs = sn.settings.search_space()
    if theirs.params != space.params or theirs.base.digest() != load_space(settings.space).base.digest():
        raise ArchlabError(f"--supernet: {settings.supernet} holds the supernet of the space "
                           f"{sn.settings.space_path or theirs.name!r}, not of --space {settings.space}")


def _retrain(settings: SearchSettings, run_dir: Path, study: optuna.Study, space: SearchSpace, emit) -> None:
    """The `retrain` best candidates by inherited score, trained standalone (results in `trials/`)."""
    from archlab.trials import run_jobs

    job_for = _jobs(settings, run_dir)
    scored = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if INHERITED in t.user_attrs]
    best = sorted(scored, key=lambda t: t.user_attrs[INHERITED])[:settings.retrain]
    jobs = [job_for(t.number, space.config(space.point_from(t.params), name=f"{space.name}-trial{t.number}"),
                    {LATENCY: t.user_attrs[LATENCY], INHERITED: t.user_attrs[INHERITED], "rank": rank})
            for rank, t in enumerate(best, 1)]
    run_jobs(jobs, settings, run_dir, "retrain", on_event=lambda kind, job, info: emit(kind, {"job": job.key, **job.meta,
                                                                                            "result": info}))


def write_outputs(settings: SearchSettings, run_dir: Path) -> dict:
    """trials.csv/.parquet, pareto.png, best/*.yaml and summary.md from the run's Optuna study and
    its jobs' results (a failed job's reason, its training and scoring seconds)."""
    from archlab.trials import read

    study = optuna.load_study(study_name=run_dir.name, storage=_storage(settings, run_dir))
    df = trials_frame(study, settings.metrics)
    inherited = settings.evaluator == "supernet"
    retrained = f"retrained_{settings.objective}"
    if inherited:  # the retrained candidates' results are the jobs of their trial numbers
        df["score_seconds"] = [t.user_attrs.get("score_seconds") for t in study.get_trials(deepcopy=False)]
        df[retrained] = None
        df.loc[[(run_dir / "trials" / f"trial{n:04d}.json").is_file() for n in df["number"]], "job"] = \
            df["number"].map(lambda n: f"trial{n:04d}")
    for i, r in df.iterrows():
        result = read(run_dir / "trials" / f"{r['job']}.json") if r["job"] else None
        if result:
            df.loc[i, ["status", "train_seconds", "score_seconds"]] = [result.get("status"), result.get("seconds"),
                                                                       result.get("score_seconds")]
            if inherited:
                df.loc[i, retrained] = result.get(settings.objective)
            if result.get("status") != "ok" and not r["reason"]:
                df.loc[i, "reason"] = f"{result.get('status')}: {result.get('reason', '')}"[:300]
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
    summary = {"run_dir": str(run_dir), "settings": asdict(settings), **n, "asha": asha_note(settings)}
    if inherited:
        seconds = trained["score_seconds"].dropna()
        summary["inherited"] = {"scored": len(trained), "retrained": int(trained[retrained].notna().sum()),
                                "median_score_seconds": float(seconds.median()) if len(seconds) else None}
    rank_by = retrained if inherited and trained[retrained].notna().any() else settings.objective
    if len(trained):
        pareto_plot(df, settings.objective, settings.budget_ms, run_dir / "pareto.png")
        best = export_best(df, load_space(settings.space).at_resolution(Candidates(
            settings.space, settings.table, settings.budget_ms).predictor.resolution), rank_by, run_dir / "best")
        top = trained[trained[rank_by].notna()].sort_values(rank_by).iloc[0]
        summary["best"] = {"trial": int(top["number"]), settings.objective: float(top[rank_by]),
                           LATENCY: float(top[LATENCY]), "config": str(best[0]), "ranked_by": rank_by}
    write_atomic(run_dir / "summary.md", summary_markdown(summary, df, settings))
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def asha_note(settings: SearchSettings) -> str:
    """Whether ASHA early stopping runs, and why not."""
    t = settings.train_config
    reports = len({*range(t.report_every, t.steps + 1, t.report_every), t.steps})
    if not settings.asha:
        return "off (--no-asha)"
    if reports + 1 <= 3:
        return (f"off: {t.steps} steps give only {reports} training-loss report(s) every {t.report_every} steps, too "
                "few to stop on")
    return f"on: stops trials on the training loss ({reports} reports per trial)"


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
             f"failed: {summary['failed']}; interrupted while being drawn: {summary['interrupted']}",
             f"- early stopping (ASHA): {summary['asha']}"]
    if "inherited" in summary:
        i = summary["inherited"]
        lines[-2:] = [f"- scored with the weights of the supernet `{settings.supernet}` ({settings.eval_images} held-out "
                      f"images, median {i['median_score_seconds'] or 0:.1f} s a candidate): {i['scored']}; retrained "
                      f"standalone (the best {settings.retrain} by inherited {o}): {i['retrained']}"]
    if "best" in summary:
        b = summary["best"]
        lines += [f"- best: trial {b['trial']}, {b['ranked_by'].replace('_', ' ')} {b[o]:.4g}, predicted {b[LATENCY]:.1f} "
                  f"ms -> `{b['config']}`", "",
                  "![Pareto front](pareto.png)", ""]
    failed = df[(df["state"] == "FAIL") & (df["reason"] != INTERRUPTED)]
    if len(failed):
        lines += ["", "Failed trials:", ""] + [f"- trial {int(r['number'])}: {r['reason'] or 'no reason recorded'}"
                                              for _, r in failed.iterrows()]
    return "\n".join(lines) + "\n"
