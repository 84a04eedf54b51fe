"""The latency-budgeted Optuna searcher and the search outputs; a real Ray Tune search killed and resumed."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna

import pytest
import yaml

from archlab.decompose import decompose
from archlab.latency.predictor import fit, predictor_path
from archlab.search import Candidates, counts, export_best, make_sampler, open_study, pareto_front, pareto_plot, trials_frame
from archlab.space import load_space
from conftest import kill_when, terminal_job, tiny_dict
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


def _proposer(space_path, table, budget, run_dir, sampler="random", seed=0, metrics=("val_loss",), study=None, **kw):
    from archlab.search import Proposer, SearchSettings, _jobs

    settings = SearchSettings(space=str(space_path), table=str(table), budget_ms=budget, cpus_per_trial=1)
    study = study or optuna.create_study(directions=["minimize"] * len(metrics), sampler=make_sampler(sampler, seed))
    return Proposer(study, Candidates(space_path, table, budget), _jobs(settings, Path(run_dir)), list(metrics), settings,
                    **kw)


def _finish(proposer, trial_id, config, result):
    """What a Ray trial does: the job writes its result (or none, when ASHA stops it); Ray reports the end."""
    if result is not None:
        Path(config["job"]["result"]).parent.mkdir(parents=True, exist_ok=True)
        Path(config["job"]["result"]).write_text(json.dumps(result))
    proposer.on_trial_complete(trial_id)


def _drive(proposer, n, objective=lambda ms: 1.0 / ms):
    """What Ray Tune does: ask for n trials, complete each with a result."""
    handed = []
    for i in range(n):
        config = proposer.suggest(f"t{i}")
        handed.append(config)
        ms = config["job"]["meta"]["predicted_ms"]
        _finish(proposer, f"t{i}", config, {"status": "ok", "val_loss": objective(ms)})
    return handed


def test_candidates_over_budget_are_never_handed_out(setup, tmp_path):
    space_path, space, table, every = setup
    budget = every[len(every) // 2]  # about half the space is over budget
    proposer = _proposer(space_path, table, budget, tmp_path)
    handed = _drive(proposer, 8)
    assert all(c["job"]["meta"]["predicted_ms"] <= budget for c in handed)
    assert all(c["job"]["train"]["threads"] == 1 and Path(c["job"]["result"]).is_absolute() for c in handed)
    df = trials_frame(proposer.study, ["val_loss"])
    n = counts(df)
    assert n["trained"] == 8 and n["rejected_over_budget"] > 0 and n["sampled"] == 8 + n["rejected_over_budget"]
    rejected = df[df["state"] == "REJECTED"]
    assert (rejected["predicted_ms"] > budget).all() and rejected["val_loss"].isna().all()
    for t in proposer.study.trials:  # every trial carries its constraint, so samplers can learn from it
        assert (t.constraints["latency_ms"] > 0) == bool(t.user_attrs.get("rejected"))
        # a rejected candidate is never trained: PRUNED without a value, not COMPLETE with a fake one
        assert t.state.name == ("PRUNED" if t.user_attrs.get("rejected") else "COMPLETE")
        assert t.user_attrs["budget_ms"] == budget


def test_a_budget_nothing_meets_finishes_the_search(setup, tmp_path):
    from ray.tune.search import Searcher

    space_path, _, table, every = setup
    proposer = _proposer(space_path, table, every[0] / 2, tmp_path, sampler="tpe", max_rejections=20)
    assert proposer.suggest("t0") == Searcher.FINISHED and "no candidate within the latency budget" in proposer.message


def test_failed_and_stopped_trials_are_recorded_as_such(setup, tmp_path):
    space_path, _, table, every = setup
    proposer = _proposer(space_path, table, every[-1], tmp_path, sampler="nsga2", metrics=("val_loss", "kid"))
    configs = [proposer.suggest(f"t{i}") for i in range(4)]
    _finish(proposer, "t0", configs[0], {"status": "ok", "val_loss": 0.5, "kid": 0.1})
    _finish(proposer, "t1", configs[1], {"status": "diverged", "reason": "non-finite loss at step 3"})
    _finish(proposer, "t2", configs[2], None)  # stopped by the scheduler before scoring: no result
    proposer.on_trial_complete("t3", error=True)  # its process died: no result, and not an early stop
    assert [t.state.name for t in proposer.study.trials] == ["COMPLETE", "FAIL", "PRUNED", "FAIL"]
    assert proposer.study.trials[1].user_attrs["reason"].startswith("diverged: non-finite")


def test_most_trials_failing_stops_the_search(setup, tmp_path):
    from ray.tune.search import Searcher

    space_path, _, table, every = setup
    proposer = _proposer(space_path, table, every[-1], tmp_path)
    for i in range(3):
        _finish(proposer, f"t{i}", proposer.suggest(f"t{i}"), {"status": "failed", "reason": "RuntimeError: boom"})
    assert proposer.suggest("t3") == Searcher.FINISHED and "3 of 3 trials failed" in proposer.message


def test_training_loss_reaches_the_study_as_learning_curves(setup, tmp_path):
    space_path, _, table, every = setup
    proposer = _proposer(space_path, table, every[-1], tmp_path)
    config = proposer.suggest("t0")
    for step, loss in ((10, 0.9), (20, 0.7)):
        proposer.on_trial_result("t0", {"train_loss": loss, "step": step})
    _finish(proposer, "t0", config, {"status": "ok", "val_loss": 0.6})
    assert proposer.study.trials[0].intermediate_values == {10: 0.9, 20: 0.7}


def test_outputs_pareto_plot_and_best_configs(setup, tmp_path):
    space_path, space, table, every = setup
    proposer = _proposer(space_path, table, every[-1], tmp_path, sampler="tpe", seed=1)
    _drive(proposer, 10)
    df = trials_frame(proposer.study, ["val_loss"])
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


def _trained(study):
    return {t.number: (t.values, t.datetime_complete) for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" and not t.user_attrs.get("rejected")}


def test_search_runs_on_ray_and_resumes_after_sigkill(setup, tmp_path):
    """A real search (tiny proxies on the synthetic set), killed with SIGKILL once a trial has
    finished, then resumed: finished trials are kept as they were, and the total reaches 4."""
    space_path, space, table, every = setup
    budget = every[len(every) // 2]
    run = tmp_path / "run"
    base = [sys.executable, "-m", "archlab.cli", "search"]
    argv = base + ["--space", str(space_path), "--table", str(table), "--budget-ms", str(budget), "--trials", "4",
                   "--dataset", "synthetic", "--image-size", "8", "--classes", "3", "--per-class", "8",
                   "--val-per-class", "4", "--steps", "6", "--batch", "4", "--width-mult", "1", "--samples", "0",
                   "--cpus-per-trial", "1", "--out", str(run)]
    kill_when(argv, lambda: (run / "optuna.journal").exists() and bool(_trained(open_study(run))), timeout=240)
    before = _trained(open_study(run))
    assert 1 <= len(before) < 4
    done = subprocess.run(base + ["--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _trained(open_study(run))
    assert len(after) == 4
    assert all(after[k] == v for k, v in before.items())  # finished trials kept, not told again
    for name in ("trials.csv", "trials.parquet", "pareto.png", "summary.md", "best/best-1.yaml"):
        assert (run / name).is_file(), name
    import pandas as pd

    df = pd.read_csv(run / "trials.csv")
    assert (df[df["state"] == "COMPLETE"]["predicted_ms"] <= budget).all()
    assert "rejected over the budget" in (run / "summary.md").read_text()


@pytest.mark.parametrize("moment", ["start-up", "mid-trial"])
def test_ctrl_c_says_how_to_resume(setup, tmp_path, moment):
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group, Ray's gcs_server and raylet
    included), while Ray starts or mid-trial: archlab (not Ray Tune's handler, which would suggest
    Tuner.restore) exits 130 with the `--resume` command, the study intact. Any moment must give this,
    so the test does not depend on how fast the machine is."""
    import signal
    import time

    space_path, space, table, every = setup
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "archlab.cli", "search", "--space", str(space_path), "--table", str(table),
            "--budget-ms", str(every[-1]), "--trials", "3", "--dataset", "synthetic", "--image-size", "8", "--classes",
            "3", "--per-class", "8", "--val-per-class", "4", "--steps", "20000", "--checkpoint-every", "20", "--batch", "4",
            "--width-mult", "1", "--samples", "0", "--cpus-per-trial", "1", "--out", str(run)]
    # long trials with early checkpoints: the first checkpoint means a trial is mid-training when Ctrl-C comes (with
    # 400 steps a fast machine could finish every trial between the checkpoint and the signal)
    ready = {"start-up": lambda: (run / "optuna.journal").is_file(),  # the study exists: Ray is about to start
             "mid-trial": lambda: bool(list((run / "trials").glob("trial*/checkpoint.pt")))}[moment]
    proc = terminal_job(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "the search ended before the signal"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert f"archlab search --resume {run}" in err and "Tuner.restore" not in err + out
    assert (run / "optuna.journal").is_file() and (run / "search.json").is_file()


def test_resume_without_ray_state_runs_only_the_remaining_trials(setup, tmp_path):
    """Killed before Ray wrote its first checkpoint: the resume counts what the study already finished,
    closes the trial that was being set up as interrupted, and runs only the rest."""
    space_path, space, table, every = setup
    run = tmp_path / "run"
    base = [sys.executable, "-m", "archlab.cli", "search"]
    argv = base + ["--space", str(space_path), "--table", str(table), "--budget-ms", str(every[-1]), "--trials", "2",
                   "--dataset", "synthetic", "--image-size", "8", "--classes", "3", "--per-class", "8",
                   "--val-per-class", "4", "--steps", "4", "--batch", "4", "--width-mult", "1", "--samples", "0",
                   "--cpus-per-trial", "1", "--out", str(run)]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _trained(open_study(run))
    assert len(before) == 2
    shutil.rmtree(run / "ray")
    open_study(run).ask()  # a trial the killed driver had created but not yet filled in: no params at all
    settings = json.loads((run / "search.json").read_text())
    (run / "search.json").write_text(json.dumps({**settings, "trials": 3}))
    done = subprocess.run(base + ["--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _trained(open_study(run))
    assert len(after) == 3 and all(after[k] == v for k, v in before.items())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] == 1 and summary["running"] == 0 and (run / "best" / "best-1.yaml").is_file()


def test_rdb_storage_url_is_accepted_and_a_bad_one_is_one_line(setup, tmp_path):
    from archlab.errors import ArchlabError
    from archlab.search import SearchSettings, _storage, _study

    space_path, _, table, every = setup
    settings = SearchSettings(space=str(space_path), table=str(table), budget_ms=every[-1],
                              storage=f"sqlite:///{tmp_path / 'study.db'}")
    settings.multi, settings.sampler = True, "nsga2"
    run = tmp_path / "s"
    proposer = _proposer(space_path, table, every[-1], tmp_path, metrics=settings.metrics,
                         study=_study(settings, run, create=True))
    config = proposer.suggest("t0")
    _finish(proposer, "t0", config, {"status": "ok", "val_loss": 0.5, "predicted_ms": 1.0})
    study = optuna.load_study(study_name="s", storage=settings.storage)  # what optuna-dashboard opens
    assert study.metric_names == ["val_loss", "predicted_ms"]
    assert [t.state.name for t in study.trials if not t.user_attrs.get("rejected")] == ["COMPLETE"]
    with pytest.raises(ArchlabError, match="--storage"):
        _storage(SearchSettings(space="", table="", budget_ms=1, storage="nosuchdb://x"), tmp_path)


def test_a_candidate_the_table_does_not_cover_is_flagged_in_the_trials(setup, tmp_path):
    space_path, space, _, every = setup
    samples = [c for _, c in space.sample(18, seed=0)]
    table = tmp_path / "narrow.csv"  # calibrated on the cheapest sample only: bigger candidates leave its range
    cheapest = min(samples, key=lambda c: sum(1 for _ in decompose(c)))
    write_synthetic(table, space.block_signatures(), [cheapest])
    fit(table).save(predictor_path(table))
    cands = Candidates(space_path, table, every[-1] * 10)
    proposer = _proposer(space_path, table, every[-1] * 10, tmp_path)
    _drive(proposer, 10)
    df = trials_frame(proposer.study, ["val_loss"])
    for _, row in df.iterrows():
        point = space.point_from({p.path: row[f"param.{p.path}"] for p in space.params})
        assert bool(row["latency_flag"]) == cands.predictor.predict(space.config(point)).extrapolated
    assert set(df["latency_flag"]) == {"", "outside calibration"}  # both occur in this sample


def test_the_study_reads_well_in_optuna_dashboard(setup, tmp_path):
    """Served by optuna-dashboard over HTTP: the named objective, rejected candidates marked as such
    (PRUNED, with the reason), every candidate's predicted latency and the budget (the constraint), and
    the training loss as learning curves."""
    pytest.importorskip("optuna_dashboard")
    import socket
    import time
    import urllib.request

    from archlab.search import SearchSettings, _study

    space_path, _, table, every = setup
    budget = every[len(every) // 4]  # most of the space is over the budget
    run = tmp_path / "run"
    run.mkdir()
    settings = SearchSettings(space=str(space_path), table=str(table), budget_ms=budget, sampler="random")
    proposer = _proposer(space_path, table, budget, run, study=_study(settings, run, create=True))
    for i in range(6):
        config = proposer.suggest(f"t{i}")
        for step, loss in ((10, 0.9), (20, 0.7)):
            proposer.on_trial_result(f"t{i}", {"train_loss": loss - 0.1 * i, "step": step})
        _finish(proposer, f"t{i}", config, {"status": "ok", "val_loss": 0.6 - 0.1 * i})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which("optuna-dashboard")
    if dashboard is None:
        pytest.skip("the optuna-dashboard command is not installed")
    server = subprocess.Popen([dashboard, str(run / "optuna.journal"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return json.loads(r.read())

        for _ in range(100):
            try:
                studies = get("/api/studies")["study_summaries"]
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("optuna-dashboard did not answer")
        (summary,) = studies
        study = get(f"/api/studies/{summary['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert study["objective_names"] == ["val_loss"] and study["has_intermediate_values"]
    trials = study["trials"]
    rejected = [t for t in trials if any(a["key"] == "rejected" for a in t["user_attrs"])]
    trained = [t for t in trials if t not in rejected]
    assert len(trained) == 6 and rejected, "some candidates are rejected"
    assert all(t["state"] == "Pruned" and not t.get("values") for t in rejected)
    assert all(t["state"] == "Complete" and len(t["intermediate_values"]) == 2 for t in trained)
    for t in trials:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert float(attrs["budget_ms"]) == pytest.approx(budget) and float(attrs["predicted_ms"]) > 0
