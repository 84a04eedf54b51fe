"""The proxy-fidelity benchmark on a tiny panel: trains every preset and the reference through the
trials engine, analyses ranks and noise, writes the report, resumes without retraining, and reuses
a training another batch already ran."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from archlab import fidelity
from archlab.errors import ArchlabError
from conftest import tiny_dict

PRESETS = {
    "quick": {"image_size": 8, "width_mult": 0.25, "steps": 2, "batch": 4, "val_images": 8, "samples": 6,
              "sample_steps": 2, "fid_extractor": "randconv", "fid_reference": 8},
    "slow": {"image_size": 8, "width_mult": 0.25, "steps": 4, "batch": 4, "val_images": 8, "samples": 6,
             "sample_steps": 2, "fid_extractor": "randconv", "fid_reference": 8},
    "long": {"image_size": 8, "width_mult": 0.25, "steps": 16, "batch": 8, "val_images": 8, "samples": 6,
             "sample_steps": 2, "fid_extractor": "randconv", "fid_reference": 8},
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    d = tmp_path_factory.mktemp("fidelity")
    ladder = d / "ladder.yaml"
    base = tiny_dict(stages=[dict(channels=32), dict(channels=64, transformer_depth=1)])
    ladder.write_text(yaml.safe_dump({
        "name": "tiny", "base": base,
        "rows": [{"name": "base", "paper": {"fid": 4.0}}, {"name": "sep", "set": {"stages.*.conv": "separable"},
                                                            "paper": {"fid": 3.0}},
                 {"name": "nosa", "set": {"stages.1.self_attention": False}, "paper": {"fid": 3.5}}]}))
    space = d / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "tiny", "base": base, "params": {
        "stages.1.transformer_depth": [1, 2], "stages.*.ffn_ratio": [2, 3], "stages.0.conv": ["standard", "separable"]}}))
    pfile = d / "presets.yaml"
    pfile.write_text(yaml.safe_dump(PRESETS))
    return ladder, space, pfile


def _settings(lab, **over):
    ladder, space, pfile = lab
    values = dict(ladder=str(ladder), space=str(space), space_samples=1, presets=[f"{pfile}:quick", f"{pfile}:slow"],
                  reference=f"{pfile}:long", default_preset="slow", seeds=2, cpus_per_trial=1, concurrency=2,
                  data={"spec": "synthetic", "resolution": 8, "classes": 3, "per_class": 8, "val_per_class": 4, "seed": 0})
    return fidelity.FidelitySettings(**{**values, **over})


def test_fidelity_trains_analyses_reports_and_resumes(lab, tmp_path):
    s = _settings(lab)
    results, work, out = tmp_path / "results", tmp_path / "work", tmp_path / "report"
    a = fidelity.run(s, results, work)
    assert a["designs"] == ["L0-base", "L1-sep", "L2-nosa", "S0"] and not a["missing"]
    files = sorted(results.rglob("*-seed*.json"))
    assert len(files) == 4 * (2 * 2 + 1)
    for name in ("quick", "slow"):
        e = a["presets"][name]
        assert e["cpu_minutes_per_design"] > 0 and e["trainings"] == 8
        for score in fidelity.SCORES:
            sc = e["scores"][score]
            assert -1 <= sc["kendall_tau"] <= 1 and len(sc["kendall_tau_ci"]) == 2 and sc["spearman_rho"] is not None
            assert sc["noise"] > 0 and sc["designs"] == 4 and len(sc["means"]) == 4
            assert sc["ladder_kendall_tau_vs_paper_fid"] is not None and -1 <= sc["seed_vs_seed_tau"] <= 1
            assert sc["ladder_steps_as_reference"][1] == 2  # the tiny ladder's 3 rows: 2 changes
            assert len(sc["kendall_tau_per_seed"]) == 2 and all(-1 <= t <= 1 for t in sc["kendall_tau_per_seed"])
    r = json.loads(files[0].read_text())
    assert r["hardware"] and r["threads"] == 1 and r["score_seconds"] > 0 and len(r["val_loss_t"]) == 8
    paths = fidelity.write_report(a, s, out, "archlab fidelity ...")
    md = (out / "proxy_fidelity.md").read_text()
    assert "| `slow` | val loss |" in md and "Kendall tau" in md and (out / "proxy_fidelity.png").stat().st_size > 0
    js = json.loads((out / "proxy_fidelity.json").read_text())
    assert js["default_cpu_preset"] == "slow" and set(js["presets"]["slow"]["scores"]) == set(fidelity.ALL_SCORES)
    assert js["presets"]["slow"]["scores"]["fid_randconv"]["kendall_tau"] is not None  # derived from saved samples
    assert set(json.loads(files[0].read_text())["derived"]) == set(fidelity.DERIVED)
    assert {"kendall_tau", "kendall_tau_ci", "spearman_rho", "noise_to_spread"} <= set(js["presets"]["slow"]["scores"]["fid"])
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = fidelity.run(s, results, work)  # everything cached: nothing trains again
    assert {p: p.stat().st_mtime_ns for p in files} == stamps and again["presets"] == a["presets"]
    assert len(paths) == 3


def test_ladder_steps_count_the_changes_that_go_the_reference_way():
    assert fidelity.ladder_steps([1.0, 2.0, 1.5, 1.6], [3.0, 4.0, 3.9, 3.8]) == [2, 3]
    assert fidelity.ladder_steps([1.0, None, 1.5], [1.0, 2.0, 3.0]) is None  # no complete pair of rows


def test_seed_vs_seed_tau_tells_a_reproducible_ranking_from_noise():
    steady = [[1.0, 1.1, 1.2], [2.0, 2.1, 2.2], [3.0, 3.1, 3.2], [4.0, 4.2, 4.1]]  # every seed ranks alike
    assert fidelity.seed_vs_seed_tau(steady) == 1.0
    noisy = [[1.0, 4.0, 2.0], [2.0, 3.0, 4.0], [3.0, 1.0, 1.0], [4.0, 2.0, 3.0]]
    assert fidelity.seed_vs_seed_tau(noisy) < 0.3
    assert fidelity.seed_vs_seed_tau([[1.0], [2.0], [3.0]]) is None  # one seed: nothing to compare


def test_a_training_another_batch_ran_is_reused(lab, tmp_path):
    """The first test trained these presets in its own folder; another folder's jobs are the same
    trainings (same design, data and settings), so they come from the content cache, untrained."""
    from archlab.trials import run_job

    s = _settings(lab)
    designs = fidelity.panel(s.ladder, s.space, s.space_samples, s.panel_seed)
    jobs = [j for j in fidelity.jobs(s, designs, tmp_path / "b", tmp_path / "wb") if j.meta["preset"] == "quick"]
    results = [run_job(j) for j in jobs]
    assert len(results) == 8 and all(r.get("reused") and r["status"] == "ok" for r in results)
    assert not (tmp_path / "wb").exists()  # nothing trained, so no checkpoint folder


def test_committed_results_without_a_cache_serve_another_batch(lab, tmp_path, monkeypatch):
    """A fresh clone has the committed results but no content cache: the benchmark files them in the
    cache, so another batch with the same trainings (the ablation's rows, say) reuses them, stripped of
    the first batch's names."""
    from archlab.trials import cached, run_job

    s = _settings(lab)
    designs = fidelity.panel(s.ladder, s.space, s.space_samples, s.panel_seed)
    results = tmp_path / "results"
    fidelity.run(s, results, tmp_path / "w", only=["quick"])
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "fresh-cache"))  # a fresh clone: no cache
    jobs = [j for j in fidelity.jobs(s, designs, results, tmp_path / "w") if j.meta["preset"] == "quick"]
    assert not any(cached(j).is_file() for j in jobs)
    fidelity.run(s, results, tmp_path / "w", only=[])  # trains nothing, files what the folder holds
    assert all(cached(j).is_file() for j in jobs)
    j = jobs[0]
    other = type(j)(key="row0-seed0", arch=j.arch, data=j.data, train={**j.train, "threads": 2},
                    result=str(tmp_path / "other" / "seed0.json"), workdir=str(tmp_path / "wo"), meta={"index": 0})
    r = run_job(other)
    assert r["reused"] and r["index"] == 0 and r["key"] == "row0-seed0" and "design" not in r and "preset" not in r
    assert r["val_loss"] == json.loads(Path(j.result).read_text())["val_loss"] and not (tmp_path / "wo").exists()

    import archlab.cluster
    from archlab.trials import run_jobs

    def no_ray(*a, **k):
        raise AssertionError("a batch the content cache holds whole must not start Ray")

    monkeypatch.setattr(archlab.cluster, "init_ray", no_ray)
    batch = fidelity.jobs(s, designs, tmp_path / "batch2", tmp_path / "w2")
    batch = [b for b in batch if b.meta["preset"] == "quick"]
    got = run_jobs(batch, s, tmp_path / "w2", name="again")
    assert len(got) == len(batch) and all(g["status"] == "ok" and g["reused"] for g in got)


def test_bad_settings_and_a_foreign_results_folder_are_refused(lab, tmp_path):
    pfile = lab[2]
    with pytest.raises(ArchlabError, match="under 8x"):
        fidelity.run(_settings(lab, presets=[f"{pfile}:quick", f"{pfile}:long"], default_preset="long",
                               reference=f"{pfile}:slow"), tmp_path / "r", tmp_path / "w")
    with pytest.raises(ArchlabError, match="distinct names"):
        fidelity.run(_settings(lab, reference=f"{pfile}:slow"), tmp_path / "r", tmp_path / "w")
    with pytest.raises(ArchlabError, match="--default-preset"):
        fidelity.run(_settings(lab, default_preset="cpu"), tmp_path / "r", tmp_path / "w")
    fidelity.run(_settings(lab), tmp_path / "r", tmp_path / "w", only=[])
    other = _settings(lab)
    other.data = {**other.data, "classes": 2}
    with pytest.raises(ArchlabError, match="another data"):
        fidelity.run(other, tmp_path / "r", tmp_path / "w", only=[])
    changed = tmp_path / "changed.yaml"  # the same preset name with other values
    changed.write_text(yaml.safe_dump({**PRESETS, "quick": {**PRESETS["quick"], "steps": 3}}))
    with pytest.raises(ArchlabError, match="preset 'quick' made with other values"):
        fidelity.run(_settings(lab, presets=[f"{changed}:quick", f"{pfile}:slow"]), tmp_path / "r", tmp_path / "w",
                     only=[])
    reworded = tmp_path / "reworded.yaml"  # a new description trains the same: its results stand
    reworded.write_text(yaml.safe_dump({**PRESETS, "quick": {**PRESETS["quick"], "description": "new words"}}))
    fidelity.run(_settings(lab, presets=[f"{reworded}:quick", f"{pfile}:slow"]), tmp_path / "r", tmp_path / "w",
                 only=[])
    added = tmp_path / "added.yaml"  # a preset new to the folder is welcome
    added.write_text(yaml.safe_dump({**PRESETS, "other": {**PRESETS["quick"], "batch": 2}}))
    fidelity.run(_settings(lab, presets=[f"{added}:other", f"{pfile}:slow"]), tmp_path / "r", tmp_path / "w", only=[])
    r = subprocess.run([sys.executable, "-m", "archlab.cli", "fidelity", "--presets", "smoke,nope", "--no-train",
                        "--results", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'nope' is not a preset" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_what_limits_the_default_preset_is_said_from_its_reliability():
    """Under the target: reproducible means point at the reference (the designs that move most are named);
    unreliable means point at the preset's own seed noise."""
    from archlab.fidelity import FidelitySettings, _limits

    means = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    ref = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 4.0}

    def analysis(reliability):
        val = {"kendall_tau": 0.3, "seed_vs_seed_tau": 0.7, "reliability": reliability, "seeds": 3.0, "means": means}
        return {"reference": "reference", "reference_seeds": 1,
                "presets": {"cpu": {"scores": {"val_loss": val}}, "reference": {"scores": {"val_loss": {"means": ref}}}}}

    said = _limits(analysis(0.98), FidelitySettings())[-1]
    assert "not its own seed noise" in said and "a 1 -> 3" in said and "c 3 -> 1" in said and "d 4" not in said
    assert "its own seed noise" in _limits(analysis(0.5), FidelitySettings())[-1]


def test_rankings_compare_means_over_the_seeds_every_design_has():
    """An interrupted run leaves some designs with an extra seed: each design's mean for the ranking is
    over the seeds all designs have (seed k gives every design the same batches and noise)."""
    from archlab.fidelity import Design, FidelitySettings, analyse

    designs = [Design(n, {}, "test") for n in ("a", "b", "c")]
    settings = FidelitySettings(presets=["smoke", "cpu"], seeds=2)

    def run(design, preset, seed, val_loss):
        return {"status": "ok", "design": design, "preset": preset, "seed": seed, "val_loss": val_loss,
                "key": f"{design}-{preset}-seed{seed}"}

    results = [run(n, "reference", 0, v) for n, v in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    results += [run(n, "cpu", 0, v) for n, v in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    results += [run("a", "cpu", 1, 9.0)]  # only design a has seed 1: it must not push a to the bottom
    results += [run("c", "reference", 1, 0.5)]  # nor a reference seed still training on the others
    out = analyse(settings, designs, results, boot=10)["presets"]
    val = out["cpu"]["scores"]["val_loss"]
    assert val["seeds_ranked"] == 1 and val["means"] == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert val["kendall_tau"] == pytest.approx(1.0) and val["kendall_tau_per_seed"] == [pytest.approx(1.0)]
    assert out["reference"]["scores"]["val_loss"]["means"] == {"a": 1.0, "b": 2.0, "c": 3.0}


def test_the_reference_own_seed_noise_is_measured_where_it_has_two_seeds():
    from archlab.fidelity import Design, FidelitySettings, analyse

    designs = [Design(n, {}, "test") for n in "abcde"]
    settings = FidelitySettings(presets=["smoke", "cpu"], seeds=1, reference_seeds=2)

    def run(design, preset, seed, val_loss):
        return {"status": "ok", "design": design, "preset": preset, "seed": seed, "val_loss": val_loss,
                "key": f"{design}-{preset}-seed{seed}"}

    results = [run(n, "reference", 0, v) for n, v in zip("abcde", (1, 2, 3, 4, 5))]
    results += [run(n, "reference", 1, v) for n, v in zip("abcd", (2, 1, 3, 4))]  # e: second seed not yet
    results += [run(n, "cpu", 0, v) for n, v in zip("abcde", (1, 2, 3, 4, 5))]
    noise = analyse(settings, designs, results, boot=10)["reference_noise"]
    assert noise["designs"] == 4 and noise["kendall_tau"] == pytest.approx(4 / 6)  # one of six pairs swapped
    assert noise["default_preset_vs_each_seed"] == [pytest.approx(1.0), pytest.approx(4 / 6)]


def test_the_training_loss_curve_is_extrapolated_to_4x_its_steps():
    steps = list(range(25, 201, 25))
    curve = [[s, 0.25 + 0.5 * (s / 200) ** -0.8] for s in steps]
    assert fidelity.extrapolate(curve) == pytest.approx(0.25 + 0.5 * 4 ** -0.8, rel=1e-4)
    assert fidelity.extrapolate(curve[:4]) is None  # 3 points after the first: too few for 3 parameters
    assert fidelity.extrapolate(curve[:-1] + [[200, float("nan")]]) is None
