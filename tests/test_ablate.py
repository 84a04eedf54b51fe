"""archlab ablate + archlab report: a tiny ladder costed, measured in ORT, trained on Ray and reported;
the real ladder's first two rows (the CI-size version of the committed report); failures and errors."""

import dataclasses
import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from archlab.decompose import decompose
from archlab.latency.predictor import fit, predictor_path
from archlab.ladder import load_ladder
from conftest import LADDER, tiny_dict
from test_latency_predictor import RES, write_synthetic

CLI = [sys.executable, "-m", "archlab.cli"]
TINY_TRAIN = ["--dataset", "synthetic", "--image-size", "8", "--classes", "3", "--per-class", "8", "--val-per-class", "4",
              "--steps", "3", "--batch", "4", "--width-mult", "1", "--samples", "8", "--sample-steps", "2",
              "--fid-extractor", "randconv", "--cpus-per-trial", "1"]


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    """A two-row ladder of tiny networks and a fitted (synthetic) latency table that covers them."""
    d = tmp_path_factory.mktemp("ablate")
    ladder = d / "ladder.yaml"
    ladder.write_text(yaml.safe_dump({
        "name": "tiny-ladder", "source": "test", "setting": "test",
        "base": tiny_dict(latent=dict(channels=4, resolution=RES)),
        "rows": [{"name": "base", "paper": {"fid": 4.0, "params_m": 10, "flops_g": 10, "latency_ms": 100}},
                 {"name": "separable", "set": {"stages.*.conv": "separable"},
                  "paper": {"fid": 3.0, "params_m": 8, "flops_g": 7, "latency_ms": 60}}]}))
    lad = load_ladder(ladder)
    blocks = {s.signature: s for r in lad.rows for s in decompose(r.config)}
    table = d / "tables" / "synthetic-cpu.csv"
    table.parent.mkdir()
    write_synthetic(table, list(blocks.values()), [])
    fit(table).save(predictor_path(table))
    return ladder, table


def _run(argv, timeout=600):
    return subprocess.run(CLI + argv, capture_output=True, text=True, timeout=timeout)


def _report(argv, capsys) -> tuple[int, str]:
    """`archlab report` in this process (it starts no Ray): its exit status and stdout."""
    from archlab import cli

    capsys.readouterr()
    code = cli.main(["report", *argv])
    return code, capsys.readouterr().out


def test_ablate_measures_trains_and_reports_then_resumes_without_redoing(tiny_lab, tmp_path, capsys):
    ladder, table = tiny_lab
    run, out = tmp_path / "run", tmp_path / "report"
    argv = ["ablate", str(ladder), "--seeds", "2", "--table", str(table), "--measure", str(RES), "--out", str(run)]
    first = _run(argv + TINY_TRAIN)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained 3 steps; scoring (validation loss, 8 samples for FID/KID)" in first.stderr  # progress per phase
    measured = table.parent / f"synthetic-cpu.ladder{RES}-1t.csv"  # measured for real with ORT, kept beside the table
    assert measured.is_file() and len(pd.read_csv(measured).query("kind == 'network'")) == 2
    results = sorted((run / "results").rglob("seed*.json"))
    assert len(results) == 4 and all(json.loads(p.read_text())["status"] == "ok" for p in results)
    stamps = {p: p.stat().st_mtime_ns for p in results}

    assert _report([str(run), "--out", str(out)], capsys)[0] == 0
    csv = pd.read_csv(out / "ablation.csv")
    assert len(csv) == 4 and set(csv["name"]) == {"base", "separable"} and (csv["status"] == "ok").all()
    assert csv["measured_ms_8"].notna().all() and csv["predicted_ms"].gt(0).all() and csv["val_loss"].notna().all()
    assert (csv.groupby("name")["seed"].apply(sorted) == pd.Series({"base": [0, 1], "separable": [0, 1]})).all()
    md = (out / "ablation.md").read_text()
    assert "| 1 | separable |" in md and "## Provenance" in md and "randconv" in md and "git commit" in md
    assert "ablate " + str(ladder) in md  # the command that regenerates it
    for png in ("ablation_changes.png", "ablation_latency_quality.png"):
        assert (out / png).stat().st_size > 5000

    again = _run(argv + TINY_TRAIN + ["--json"])  # everything cached: nothing trained or measured again
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["finished"] == 4 and len(json.loads(again.stdout)["results"]) == 4
    assert {p: p.stat().st_mtime_ns for p in results} == stamps
    assert len(pd.read_csv(measured)) == len(pd.read_csv(measured).drop_duplicates("key"))
    before = (out / "ablation.csv").read_bytes()
    code, stdout = _report([str(run), "--out", str(out), "--json"], capsys)
    assert code == 0 and [r["name"] for r in json.loads(stdout)["rows"]] == ["base", "separable"]
    assert (out / "ablation.csv").read_bytes() == before  # the same folder gives the same tables
    assert _report([str(run), "--out", str(out), "--name", "tiny_ablation"], capsys)[0] == 0
    assert (out / "tiny_ablation.csv").read_bytes() == before
    assert "![row-to-row changes](tiny_ablation_changes.png)" in (out / "tiny_ablation.md").read_text()
    assert (out / "tiny_ablation_latency_quality.png").is_file()


def test_an_ablation_killed_mid_row_resumes_that_training(tiny_lab, tmp_path):
    """SIGKILL while a row trains (after its first checkpoint): the same command continues that
    training from the checkpoint and finishes the ladder."""
    from conftest import kill_when

    ladder, table = tiny_lab
    run = tmp_path / "run"
    argv = CLI + ["ablate", str(ladder), "--rows", "0", "--seeds", "1", "--table", str(table), "--measure", "none",
                  "--out", str(run)] + TINY_TRAIN + ["--steps", "150", "--checkpoint-every", "30"]
    ckpt = run / "train" / "00-base" / "seed0" / "checkpoint.pt"
    kill_when(argv, ckpt.exists)
    assert not (run / "results" / "00-base" / "seed0.json").exists()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((run / "results" / "00-base" / "seed0.json").read_text())
    assert r["status"] == "ok" and r["steps"] == 150 and 30 <= r["resumed_from"] < 150


def test_real_ladder_two_rows_with_committed_latency(tmp_path, capsys):
    """The CI-size version of the committed report: the real ladder's first two rows, paper-scale cost,
    measured latency looked up in the committed tables (nothing to measure), one tiny training each."""
    run, out = tmp_path / "run", tmp_path / "report"
    done = _run(["ablate", str(LADDER), "--rows", "0,1", "--seeds", "1", "--measure", "32", "--out", str(run)] + TINY_TRAIN
                + ["--width-mult", "0.0625"])  # the proxy of a paper-width design, not the 716M-param network itself
    assert done.returncode == 0, done.stderr[-3000:]
    assert "measuring" not in done.stderr
    assert _report([str(run), "--out", str(out)], capsys)[0] == 0
    csv = pd.read_csv(out / "ablation.csv")
    assert list(csv["name"]) == ["baseline", "no-highres-sa"] and list(csv["paper_fid"]) == [3.76, 3.12]
    assert csv["params"].iloc[0] > 7e8 and csv["macs"].iloc[1] < csv["macs"].iloc[0]
    assert csv["measured_ms_32"].iloc[1] < csv["measured_ms_32"].iloc[0]
    md = (out / "ablation.md").read_text()
    assert "MACs (paper: FLOPs)" in md and "-17.5% / -16.9% ok" in md


def test_a_failed_training_is_reported_not_dropped(tiny_lab, tmp_path, monkeypatch):
    from archlab import ablate, train
    from archlab.report import write_report

    ladder, table = tiny_lab
    settings, lad = ablate.open_run(ablate.AblateSettings(
        ladder=str(ladder), seeds=1, table=str(table), measure=[],
        data={"spec": "synthetic", "resolution": 8, "classes": 3, "per_class": 8, "val_per_class": 4, "seed": 0},
        train={**dataclasses.asdict(train.TrainConfig(steps=2, batch=4, width_mult=1.0, samples=0))}), tmp_path)
    ablate.cost_rows(lad, lad.rows, tmp_path)
    ablate.latency_rows(lad.rows, settings, tmp_path)
    ok = ablate.run_one(settings, 0, 0, tmp_path)

    def boom(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(train, "train", boom)
    bad = ablate.run_one(settings, 1, 0, tmp_path)
    assert ok["status"] == "ok" and bad["status"] == "failed" and "out of memory (simulated)" in bad["reason"]
    rep = write_report(tmp_path, tmp_path / "report", command="test")
    md = (tmp_path / "report" / "ablation.md").read_text()
    assert "## Runs that did not finish" in md and "row 1 separable, seed 0: failed: RuntimeError: out of memory" in md
    assert "| 1 | separable |" in md and "| failed |" in md
    assert "measured: not in this run (`--measure none`)." in md and "measured tables: none" in md  # measure=[]
    csv = pd.read_csv(tmp_path / "report" / "ablation.csv")
    assert list(csv["status"]) == ["ok", "failed"]
    assert rep["rows"][1].scores["val_loss"].mean is None
    monkeypatch.undo()  # a run that raised is run again next time; a finished one is not
    assert ablate.run_one(settings, 1, 0, tmp_path)["status"] == "ok"
    assert ablate.run_one(settings, 0, 0, tmp_path) == ok


def test_results_kept_apart_regenerate_the_report_without_training(tiny_lab, tmp_path, monkeypatch):
    """`--results`: the per-training results live in their own (committable) folder; a fresh run folder
    and an empty cache given that folder train nothing, and the report reads them; a folder of
    results made with another training is refused."""
    from archlab import ablate, train
    from archlab.errors import ArchlabError
    from archlab.report import write_report

    ladder, table = tiny_lab
    kept = tmp_path / "kept"

    def settings(steps=2):
        return ablate.AblateSettings(
            ladder=str(ladder), seeds=1, table=str(table), measure=[], results=str(kept),
            data={"spec": "synthetic", "resolution": 8, "classes": 3, "per_class": 8, "val_per_class": 4, "seed": 0},
            train={**dataclasses.asdict(train.TrainConfig(steps=steps, batch=4, width_mult=1.0, samples=0))})

    first = tmp_path / "first"
    s, lad = ablate.open_run(settings(), first)
    done = [ablate.run_one(s, i, 0, first) for i in (0, 1)]
    assert [p.relative_to(kept).as_posix() for p in sorted(kept.rglob("seed*.json"))] == \
        ["00-base/seed0.json", "01-separable/seed0.json"]
    assert not (first / "results").exists() and (kept / "ablate.json").is_file()

    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained again"))
    second = tmp_path / "second"
    s, lad = ablate.open_run(settings(), second)
    ablate.cost_rows(lad, lad.rows, second)
    ablate.latency_rows(lad.rows, s, second)
    assert [ablate.run_one(s, i, 0, second)["val_loss"] for i in (0, 1)] == [r["val_loss"] for r in done]
    rep = write_report(second, tmp_path / "report", command="test")
    assert [r.scores["val_loss"].mean for r in rep["rows"]] == [r["val_loss"] for r in done]
    with pytest.raises(ArchlabError, match="--results: .* other train settings .*steps"):
        ablate.open_run(settings(steps=3), tmp_path / "third")


def test_errors_are_one_line(tiny_lab, tmp_path):
    ladder, table = tiny_lab
    other = tmp_path / "other.yaml"
    data = yaml.safe_load(ladder.read_text())
    data["rows"][1]["set"] = {"stages.*.ffn_ratio": 2}
    other.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    base = ["--table", str(table), "--out", str(run)]
    from archlab import ablate

    ablate.open_run(ablate.AblateSettings(ladder=str(ladder), table=str(table), measure=[]), run)
    bad_row = tmp_path / "bad.yaml"
    data["rows"][1]["set"] = {"stages.7.conv": "separable"}
    bad_row.write_text(yaml.safe_dump(data))
    cases = [(["ablate", str(other), "--measure", "none"] + base, "holds results of another ladder"),
             (["ablate", str(ladder), "--measure", "none", "--dataset", str(tmp_path / "nowhere")] + base, "--dataset"),
             (["ablate", str(bad_row), "--measure", "none"] + base, "stages.7"),
             (["ablate", str(ladder), "--measure", "32,big"] + base, "--measure"),
             (["ablate", str(ladder), "--measure", "none", "--rows", "nope"] + base, "--row"),
             (["ablate", str(ladder), "--measure", "none", "--device", "cuda"] + base, "--gpus-per-trial"),
             (["report", str(tmp_path)], "not an ablation folder")]
    for argv, message in cases:
        r = _run(argv, timeout=60)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)


def test_annotations_can_change_designs_cannot(tiny_lab, tmp_path):
    """Editing the paper's numbers or a why_differs note keeps a results folder; changing a design does not."""
    from archlab import ablate
    from archlab.errors import ArchlabError

    ladder, table = tiny_lab
    mine = tmp_path / "ladder.yaml"
    data = yaml.safe_load(ladder.read_text())
    mine.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    ablate.open_run(ablate.AblateSettings(ladder=str(mine), table=str(table), measure=[]), run)
    data["rows"][1]["paper"]["fid"] = 2.5
    data["rows"][1]["why_differs"] = {"latency": "a reason written after the run"}
    mine.write_text(yaml.safe_dump(data))
    ablate.open_run(ablate.AblateSettings(ladder=str(mine), table=str(table), measure=[]), run)
    data["rows"][1]["set"]["stages.*.ffn_ratio"] = 2
    mine.write_text(yaml.safe_dump(data))
    with pytest.raises(ArchlabError, match="another ladder"):
        ablate.open_run(ablate.AblateSettings(ladder=str(mine), table=str(table), measure=[]), run)


def _row(i, paper, predicted_ms=100.0, predicted_error=None, why=None, **seeds):
    """A ladder row as the report summarises it; `seeds` gives a score's values over seeds."""
    from archlab.report import RowSummary, _score

    return RowSummary(i, f"r{i}", "", paper, why or {}, 1, 1, 2, predicted_ms, "", predicted_error, {},
                      {k: _score(seeds.get(k, [])) for k in ("fid", "kid", "val_loss")}, 0, 0, (), "ok")


def test_a_predicted_latency_change_within_the_predictors_error_gets_no_verdict():
    from archlab.report import changes
    from archlab.verdict import Verdict

    def verdict(a, b, err):
        (ch,) = changes([_row(0, {"latency_ms": 100}, a, err), _row(1, {"latency_ms": 100}, b, err)])
        return ch["predicted latency"].verdict

    # the paper's latency is unchanged; 2 x 1.3% of hypot(1000, 1010) = 28 ms of predictor error
    assert verdict(1000, 1010, 0.013) is Verdict.NOISE
    assert verdict(1000, 1050, 0.013) is Verdict.DISAGREE
    assert verdict(1000, 1010, None) is Verdict.DISAGREE  # an uncalibrated predictor has no error estimate: no band


def _score_change(a_seeds, b_seeds, paper=(4.0, 3.0)):
    from archlab.report import changes

    rows = [_row(i, {"fid": fid}, why={"fid": "a recorded reason"}, val_loss=seeds)
            for i, (seeds, fid) in enumerate(((a_seeds, paper[0]), (b_seeds, paper[1])))]
    (ch,) = changes(rows)
    return ch["val loss"]


def test_a_score_verdict_comes_from_the_interval_over_seeds():
    from archlab.verdict import Verdict

    # the seeds move both rows together (shared batches and init): paired differences are all -0.01
    a = [0.50, 0.55, 0.60]
    b = [0.49, 0.541, 0.589]
    m = _score_change(a, b)
    assert m.test.paired and m.test.correlation > 0.99
    assert m.verdict is Verdict.AGREE and m.test.high < 0  # lower loss, as the paper's FID: agree
    m = _score_change(a, [0.51, 0.56, 0.61])  # worse by 0.01 on every seed: resolved, and against the paper
    assert m.verdict is Verdict.DISAGREE and m.reason == "a recorded reason"
    m = _score_change(a, [0.47, 0.58, 0.59])  # the same mean change, but seed by seed it is noise
    assert m.verdict is Verdict.NOISE and "includes 0" in m.reason
    assert m.test.seeds_to_resolve is None  # a mean change of 0.003 under 0.03 of noise: no practical number
    m = _score_change(a, [0.47, 0.56, 0.59])  # a mean change of -0.01 under 0.02 of paired noise
    assert m.verdict is Verdict.NOISE and 10 < m.test.seeds_to_resolve < 40
    assert m.test.before == pytest.approx(0.55)  # the row above's mean: a relative bound is a share of it


def test_fewer_than_three_seeds_give_no_score_verdict():
    from archlab.verdict import Verdict

    m = _score_change([0.50, 0.55], [0.40, 0.45])
    assert m.verdict is Verdict.NOISE and "at least 3" in m.reason
    m = _score_change([0.50, 0.55, None], [0.40, 0.45, 0.43])  # a failed seed leaves the pairs
    assert m.verdict is Verdict.NOISE and m.test.seeds == 2


def test_one_rule_decides_cost_latency_and_quality():
    """`verdict.compare`: the same rule for every metric; no paper number, no verdict; a missing reason is said."""
    from archlab.verdict import MACS, PREDICTED, SCORES, Noise, Verdict, compare

    paper0, paper1 = {"flops_g": 10, "latency_ms": 100, "fid": 4.0}, {"flops_g": 8, "latency_ms": 100, "fid": 3.0}
    assert compare(MACS, (10, 9), paper1, paper0, {}).verdict is Verdict.AGREE
    up = compare(MACS, (10, 11), paper1, paper0, {})
    assert up.verdict is Verdict.DISAGREE and "why_differs.macs" in up.reason
    assert compare(MACS, (10, 11), paper1, paper0, {"macs": "wider"}).reason == "wider"
    assert compare(PREDICTED, (100, 100.2), paper1, paper0, {}).verdict is Verdict.AGREE  # both unchanged (< 0.5%)
    assert compare(SCORES["kid"], (1.0, 0.9), {}, paper0, {}).verdict is Verdict.NONE
    noisy = compare(SCORES["val_loss"], (1.0, 1.1), paper1, paper0, {}, Noise(False, "within noise"))
    assert noisy.verdict is Verdict.NOISE and noisy.reason == "within noise" and noisy.ours == pytest.approx(0.1)
    assert compare(SCORES["fid"], (4.0, 3.5), paper1, paper0, {}, Noise(True)).verdict is Verdict.AGREE


def test_a_paper_that_ablates_by_validation_loss_is_compared_by_it():
    """SnapGen++ gives validation losses, not FID: every quality score is compared with that change."""
    from types import SimpleNamespace

    from archlab.report import paper_quality
    from archlab.verdict import SCORES, Noise, Verdict, compare

    before, after = {"val_loss": 0.5131, "params_m": 372}, {"val_loss": 0.5060, "params_m": 424}
    for score in SCORES.values():
        c = compare(score, (1.0, 0.9), after, before, {}, Noise(True))
        assert c.verdict is Verdict.AGREE and c.paper == pytest.approx(-0.0138, abs=1e-4)
    assert compare(SCORES["fid"], (1.0, 1.1), after, before, {"fid": "a reason"}, Noise(True)).reason == "a reason"
    rows = [SimpleNamespace(paper=before), SimpleNamespace(paper=after)]
    assert paper_quality(rows) == ("val_loss", "val loss")
    assert paper_quality([SimpleNamespace(paper={"fid": 3.1, "val_loss": 0.5})]) == ("fid", "FID")  # FID first
