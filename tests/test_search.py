"""The latency-budgeted Optuna searcher and the search outputs (no Ray cluster needed)."""

import math

import optuna
import pytest
import yaml

from archlab.decompose import decompose
from archlab.latency.predictor import fit, predictor_path
from archlab.search import (BudgetedOptunaSearch, Candidates, counts, export_best, make_sampler, pareto_front,
                            pareto_plot, trials_frame)
from archlab.space import load_space
from conftest import tiny_dict
from test_latency_predictor import RES, write_synthetic


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    space_path = d / "space.yaml"
    space_path.write_text(yaml.safe_dump({"name": "tiny", "base": tiny_dict(latent=dict(channels=4, resolution=RES)),
                                          "params": {"stages.1.ffn_ratio": [2, 3, 4], "stages.*.conv": ["standard", "separable"],
                                                     "stages.2.transformer_depth": {"low": 1, "high": 3}}}))
    space = load_space(space_path)
    table = d / "t.csv"
    write_synthetic(table, space.block_signatures(), [c for _, c in space.sample(4, seed=1)])
    fit(table).save(predictor_path(table))
    every = sorted(Candidates(space_path, table, 1.0).predictor.predict_many([c for _, c in space.sample(18, seed=0)]))
    return space_path, space, table, every


def _drive(searcher, n, objective=lambda ms: 1.0 / ms):
    """What Ray Tune does: ask for n trials, complete each with a result."""
    handed = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        handed.append(config)
        searcher.on_trial_complete(f"t{i}", {"val_loss": objective(config["predicted_ms"])})
    return handed


def test_candidates_over_budget_are_never_handed_out(setup):
    space_path, space, table, every = setup
    budget = every[len(every) // 2]  # about half the space is over budget
    searcher = BudgetedOptunaSearch(space=Candidates(space_path, table, budget), metric="val_loss", mode="min",
                                    sampler=make_sampler("random", 0))
    handed = _drive(searcher, 8)
    assert all(c["predicted_ms"] <= budget for c in handed)
    assert all(set(c) >= {p.path for p in space.params} for c in handed)
    df = trials_frame(searcher._ot_study, ["val_loss"])
    n = counts(df)
    assert n["trained"] == 8 and n["rejected_over_budget"] > 0 and n["sampled"] == 8 + n["rejected_over_budget"]
    rejected = df[df["state"] == "REJECTED"]
    assert (rejected["predicted_ms"] > budget).all() and rejected["val_loss"].isna().all()
    for t in searcher._ot_study.trials:  # every trial carries its constraint, so samplers can learn from it
        assert (t.constraints["latency_ms"] > 0) == bool(t.user_attrs.get("rejected"))


def test_a_budget_nothing_meets_finishes_the_search(setup):
    from ray.tune.search import Searcher

    space_path, _, table, every = setup
    searcher = BudgetedOptunaSearch(space=Candidates(space_path, table, every[0] / 2), metric="val_loss", mode="min",
                                    sampler=make_sampler("tpe", 0), max_rejections=20)
    assert searcher.suggest("t0") == Searcher.FINISHED


def test_failed_and_stopped_trials_are_recorded_as_such(setup):
    space_path, _, table, every = setup
    searcher = BudgetedOptunaSearch(space=Candidates(space_path, table, every[-1]), metric=["val_loss", "kid"],
                                    mode=["min", "min"], sampler=make_sampler("nsga2", 0))
    for i in range(3):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"val_loss": 0.5, "kid": 0.1})
    searcher.on_trial_complete("t1", error=True)
    searcher.on_trial_complete("t2", {"train_loss": 0.9})  # stopped by the scheduler before scoring
    assert [t.state.name for t in searcher._ot_study.trials] == ["COMPLETE", "FAIL", "PRUNED"]


def test_outputs_pareto_plot_and_best_configs(setup, tmp_path):
    space_path, space, table, every = setup
    searcher = BudgetedOptunaSearch(space=Candidates(space_path, table, every[-1]), metric="val_loss", mode="min",
                                    sampler=make_sampler("tpe", 1))
    _drive(searcher, 10)
    df = trials_frame(searcher._ot_study, ["val_loss"])
    front = pareto_front(df, "val_loss")
    assert len(front) >= 1
    done = df[df["state"] == "COMPLETE"]
    for _, r in done.iterrows():  # nothing on the front is dominated by any trained trial
        for _, f in front.iterrows():
            assert not (r["predicted_ms"] < f["predicted_ms"] and r["val_loss"] < f["val_loss"])
    assert pareto_plot(df, "val_loss", every[-1], tmp_path / "pareto.png").stat().st_size > 1000
    paths = export_best(df, space, "val_loss", tmp_path / "best", k=2)
    assert len(paths) == 2
    from archlab.config import ArchConfig

    cfg = ArchConfig.from_dict(yaml.safe_load(paths[0].read_text()))
    row = done.sort_values("val_loss").iloc[0]
    assert cfg.name == f"tiny-trial{int(row['number'])}" and len(decompose(cfg)) > 0
    assert math.isclose(Candidates(space_path, table, 1).predictor.predict(cfg).latency_ms, row["predicted_ms"],
                        rel_tol=1e-9)
