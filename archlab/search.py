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

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from archlab.errors import ArchlabError
from archlab.space import SearchSpace, load_space

log = logging.getLogger(__name__)

OBJECTIVES = ("val_loss", "fid", "kid")
SAMPLERS = ("tpe", "nsga2", "random")
LATENCY = "predicted_ms"


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
        ms = float(self.predictor.predict_many([cfg])[0])
        trial.set_user_attr(LATENCY, ms)
        trial.set_constraint("latency_ms", ms - self.budget_ms)
        return {LATENCY: ms}


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

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or self.metric not in result:
            return  # intermediate reports (train_loss) are for the scheduler
        super().on_trial_result(trial_id, result)

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


# ---- outputs ------------------------------------------------------------------------------------

def trials_frame(study: optuna.Study, objectives: list[str]):
    """One row per trial: number, state, rejected, predicted latency, objectives, params, times."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rejected = bool(t.user_attrs.get("rejected"))
        values = t.values if (t.values and not rejected) else [None] * len(objectives)
        row = {"number": t.number, "state": "REJECTED" if rejected else t.state.name, LATENCY: t.user_attrs.get(LATENCY),
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def export_best(df, space: SearchSpace, objective: str, out_dir: str | Path, k: int = 3) -> list[Path]:
    """The k best trained trials by `objective` as ArchConfig YAML files (for cost, latency query, train)."""
    from archlab.io import write_atomic

    done = df[(df["state"] == "COMPLETE") & df[objective].notna()].sort_values(objective).head(k)
    paths = []
    for rank, (_, r) in enumerate(done.iterrows(), 1):
        point = {c[len("param."):]: r[c] for c in df.columns if c.startswith("param.")}
        cfg = space.config(point, name=f"{space.name}-trial{int(r['number'])}")
        header = (f"# trial {int(r['number'])}: {objective} {r[objective]:.4g}, predicted {r[LATENCY]:.1f} ms "
                  f"(rank {rank} of the trained trials)\n")
        paths.append(write_atomic(Path(out_dir) / f"best-{rank}.yaml", header + cfg.to_yaml()))
    return paths


def counts(df) -> dict[str, int]:
    states = df["state"].value_counts().to_dict()
    return {"sampled": int(len(df)), "rejected_over_budget": int(states.get("REJECTED", 0)),
            "trained": int(states.get("COMPLETE", 0)), "stopped_early": int(states.get("PRUNED", 0)),
            "failed": int(states.get("FAIL", 0)), "running": int(states.get("RUNNING", 0))}
