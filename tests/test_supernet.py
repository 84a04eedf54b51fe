"""The weight-shared supernet (archlab.elastic, archlab.supernet): a sub-network extracted from it
computes exactly what the supernet computes with that choice active, for every way choices nest; a
skipped block is the identity; training resumes bit for bit after kill -9; bad input is one line."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import yaml

from archlab.cost import network_cost
from archlab.elastic import Elastic, param_count
from archlab.errors import ArchlabError
from archlab.models import build_model, run_unet
from archlab.space import load_space, space_from_dict
from conftest import ROOT, tiny_dict
from test_dit import dit_dict, inputs

UNET_PARAMS = {
    "stages.0.transformer_depth": [0, 1],  # depth (and, at 0 with first_stage 0, the res block replaced)
    "stages.0.self_attention": [False, True],  # self-attention on/off
    "stages.0.conv": ["standard", "separable"],  # a choice that does not nest: a path each
    "stages.1.transformer_depth": [1, 2],
    "stages.1.expansion": [1, 2],  # hidden channels sliced
    "stages.1.ffn_ratio": [2, 4],  # FFN hidden sliced (GEGLU: per half)
    "stages.1.kv_heads": ["mhsa", 2, "mqa"],  # K/V heads sliced
    "stages.2.self_attention": [False, True],
    "conditioning.first_stage": [0, 1],  # cross-attention in stage 0
    "attention.qk_norm": [False, True],
}
DIT_PARAMS = {
    "stages.0.channels": [16, 32],  # width sliced; modulation and norms kept per width
    "stages.1.channels": [32, 48],
    "stages.1.depth": [2, 3],
    "stages.0.ffn_ratio": [2, 4],
    "stages.*.kv_heads": ["mqa", 2],
    "stages.0.attention": ["assa", "full"],  # shares what it can (Q/K/V/O), ASSA's own weights apart
    "patch": [2, 4],  # a path each
    "skips": ["none", "u", "dense"],
}


def unet_space(tmp_path=None):
    data = {"name": "tiny-unet", "base": tiny_dict(conditioning=dict(context_dim=24, context_len=5, first_stage=1,
                                                                      inject="replace")),
            "params": UNET_PARAMS}
    if tmp_path is None:
        return space_from_dict(data, "tiny-unet")
    path = tmp_path / "unet-space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def dit_space():
    base = dit_dict(stages=[dict(channels=32, depth=2, attention="assa", block=2), dict(channels=48, depth=3),
                            dict(channels=32, depth=2)], attention=dict(head_dim=8, qk_norm=True, rope=True))
    return space_from_dict({"name": "tiny-dit", "base": base, "params": DIT_PARAMS}, "tiny-dit")


@pytest.fixture(scope="module")
def unet():
    space = unet_space()
    return space, Elastic("unet", space.block_variants(), seed=0)


@pytest.fixture(scope="module")
def dit():
    space = dit_space()
    return space, Elastic("dit", space.block_variants(), seed=0)


def _same(space, net, point):
    cfg = space.config(point)
    model = build_model(cfg)
    model.load_state_dict(net.extract(cfg))
    x, t, c = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(net.activate(cfg)(x, t, c), model(x, t, c)), point
    return cfg, model


def _points(space, changes):
    """The space's first point, then one point per change of it (each nesting kind on its own)."""
    first = {p.path: p.choices[0] for p in space.params}
    return [first] + [{**first, **c} for c in changes]


def test_unet_sub_networks_compute_what_the_supernet_computes(unet):
    space, net = unet
    changes = [{"stages.1.transformer_depth": 2}, {"stages.0.transformer_depth": 1, "stages.0.self_attention": True},
               {"stages.2.self_attention": True}, {"stages.1.expansion": 2}, {"stages.1.ffn_ratio": 4},
               {"stages.1.kv_heads": 2}, {"stages.1.kv_heads": "mqa"}, {"stages.0.conv": "separable"},
               {"conditioning.first_stage": 0}, {"attention.qk_norm": True}]
    rng = random.Random(0)
    for point in _points(space, changes) + [space.sample_point(rng) for _ in range(4)]:
        cfg, model = _same(space, net, point)
        assert sum(p.numel() for p in model.parameters()) == param_count(cfg) == network_cost(cfg).params


def test_dit_sub_networks_compute_what_the_supernet_computes(dit):
    space, net = dit
    changes = [{"stages.0.channels": 32}, {"stages.1.channels": 48}, {"stages.1.depth": 3}, {"stages.0.ffn_ratio": 4},
               {"stages.*.kv_heads": 2}, {"stages.0.attention": "full"}, {"patch": 4}, {"skips": "u"},
               {"skips": "dense", "stages.1.channels": 48}]
    for point in _points(space, changes) + [space.sample_point(random.Random(1)) for _ in range(3)]:
        cfg, model = _same(space, net, point)
        assert sum(p.numel() for p in model.parameters()) == param_count(cfg) == network_cost(cfg).params


def test_narrow_choices_are_slices_of_the_wide_ones(unet, dit):
    """MQA is the first K/V head of GQA, a smaller FFN the first hidden units (GEGLU: of each half), a
    narrower DiT the first channels; what does not nest (separable convs, modulation per width) is apart."""
    space, net = unet
    first = {p.path: p.choices[0] for p in space.params}
    w = {k: net.extract(space.config({**first, **c})) for k, c in
         {"mhsa": {}, "mqa": {"stages.1.kv_heads": "mqa"}, "ffn4": {"stages.1.ffn_ratio": 4},
          "sep": {"stages.0.conv": "separable"}}.items()}
    k = "blocks.down_1_0_transformer0.attn1.to_k.weight"
    assert torch.equal(w["mqa"][k], w["mhsa"][k][: w["mqa"][k].shape[0]]) and w["mqa"][k].shape[0] < w["mhsa"][k].shape[0]
    ff = "blocks.down_1_0_transformer0.ff.proj_in.weight"
    small, big = w["mhsa"][ff], w["ffn4"][ff]
    h, hb = small.shape[0] // 2, big.shape[0] // 2
    assert torch.equal(small[:h], big[:h]) and torch.equal(small[h:], big[hb:hb + h])
    assert "blocks.up_0_0_res.conv1.weight" in w["mhsa"] and "blocks.up_0_0_res.conv1.0.weight" in w["sep"]
    assert torch.equal(w["mhsa"]["blocks.up_0_0_res.norm1.weight"], w["sep"]["blocks.up_0_0_res.norm1.weight"])
    space, net = dit
    first = {p.path: p.choices[0] for p in space.params}
    narrow, wide = (net.extract(space.config({**first, "stages.0.channels": c})) for c in (16, 32))
    q = "blocks.down_0.attn.to_q.weight"
    assert torch.equal(narrow[q], wide[q][:16, :16])
    modulation = sorted(k for k in net.keys if k.startswith("down.0:dit:modulation.1.weight|"))
    assert [k.rsplit("|", 1)[1] for k in modulation] == ["dim=16", "dim=32"]  # one weight per width


def test_a_skipped_block_is_the_identity(unet):
    """The sub-net of depth 1 is the sub-net of depth 2 with its second transformer block an identity."""
    space, net = unet
    first = {p.path: p.choices[0] for p in space.params}
    shallow, deep = space.config(first), space.config({**first, "stages.1.transformer_depth": 2})
    x, t, c = inputs(shallow)
    specs, plan = net.plan(deep)
    skipped = [s.stage == 1 and s.name.endswith("transformer1") for s in specs]
    blocks = [(lambda tokens, context, hw: tokens) if skip else net.block(m, p) for skip, (m, p) in zip(skipped, plan)]
    assert sum(skipped) == 3  # each layer of stage 1 (1 down, 2 up)
    with torch.no_grad():
        assert torch.equal(run_unet(specs, blocks, x, t, c), net.activate(shallow)(x, t, c))


def test_a_config_outside_the_supernet_is_one_line(unet, dit):
    space, net = unet
    first = {p.path: p.choices[0] for p in space.params}
    with pytest.raises(ArchlabError, match=r"block down.1.0.res: expansion=3 is more than the supernet holds \(at most 2\)"):
        net.plan(space.config(first).with_values({"stages.1.expansion": 3}))
    with pytest.raises(ArchlabError, match=r"block mid.transformer2 \(transformer\) is outside the supernet"):
        net.plan(space.config(first).with_values({"mid_depth": 3}))
    with pytest.raises(ArchlabError, match="a DiT config, but the supernet holds UNets"):
        net.plan(dit[0].base)


# ---- training --------------------------------------------------------------------------------------

def _settings(space_path, steps=6, **options):
    from archlab import presets
    from archlab.cluster import TrialSettings
    from archlab.data import DataConfig
    from archlab.supernet import make_settings

    t = presets.get("smoke").train_config(steps=steps, batch=4, width_mult=0.25, warmup=2, val_images=8,
                                          report_every=1, checkpoint_every=2, threads=1)
    data = DataConfig("synthetic", 8, classes=3, per_class=8, val_per_class=4)
    return make_settings(space_path, TrialSettings(data=asdict(data), train=asdict(t)), "smoke", **options)


KILLED = """
import os, sys
from archlab.data import load_dataset
from archlab.supernet import read_settings, train_supernet
s = read_settings(sys.argv[1])
train_supernet(s, load_dataset(s.data_config), sys.argv[1],
               on_report=lambda step, m: step == 5 and os.kill(os.getpid(), 9))
"""


def test_training_resumes_bit_identical_after_kill_9(tmp_path):
    from archlab.data import load_dataset
    from archlab.supernet import open_folder, train_supernet

    settings = _settings(unet_space(tmp_path), steps=8)
    data = load_dataset(settings.data_config)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for d in (whole, killed):
        open_folder(settings, d)
    r = train_supernet(settings, data, whole)
    assert r["status"] == "ok" and r["steps"] == 8 and r["val_loss_largest"] > 0 and len(r["history"]) == 8
    assert set(r["history"][0]) == {"step", "largest", "smallest", "random"}
    p = subprocess.run([sys.executable, "-c", KILLED, str(killed)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == -9, p.stderr[-2000:]
    assert not (killed / "result.json").exists()
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["step"] == 4
    resumed = train_supernet(settings, data, killed)
    assert resumed["resumed_from"] == 4 and resumed["history"] == r["history"]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (whole, killed))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_scores_of_a_trained_supernet(tmp_path):
    """A design's inherited score is its extracted network's validation loss, the same code and images
    as a trained design's; fine-tuning from the inherited weights trains that network."""
    from archlab.data import load_dataset
    from archlab.supernet import Supernet, open_folder, train_supernet
    from archlab.train import validation_loss

    settings = _settings(unet_space(tmp_path), steps=4, snapshot_every=2)
    out = tmp_path / "sn"
    open_folder(settings, out)
    train_supernet(settings, load_dataset(settings.data_config), out)
    sn, early = Supernet(out), Supernet(out, step=2)
    assert (sn.step, early.step) == (4, 2)
    cfg = sn.settings.search_space().sample(1, seed=3)[0][1]
    s = sn.score(cfg)
    assert s["val_loss"] == pytest.approx(sum(validation_loss(sn.extract(cfg), sn.data, 8, "cpu")) / 8, rel=1e-6)
    assert s["val_loss"] != early.score(cfg)["val_loss"]
    f = sn.finetune(cfg, 2)
    assert f["val_loss"] is not None and f["val_loss"] != s["val_loss"]
    with pytest.raises(ArchlabError, match="no such snapshot"):
        Supernet(out, step=3)


def test_a_folder_with_other_settings_is_refused(tmp_path):
    from archlab.supernet import open_folder

    space = unet_space(tmp_path)
    open_folder(_settings(space, rule="sandwich"), tmp_path / "sn")
    with pytest.raises(ArchlabError, match="holds a supernet trained with another rule"):
        open_folder(_settings(space, rule="uniform", distill="none"), tmp_path / "sn")
    open_folder(_settings(space, steps=12), tmp_path / "sn")  # more steps: the same run, trained on
    with pytest.raises(ArchlabError, match="in-place distillation needs the largest sub-net"):
        _settings(space, rule="uniform")


# ---- the commands ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`archlab supernet train` on a tiny space (a real Ray Tune trial), a latency table covering it."""
    from archlab.latency.predictor import fit, predictor_path
    from test_latency_predictor import RES, write_synthetic

    d = tmp_path_factory.mktemp("supernet")
    space_path = unet_space(d)
    space = load_space(space_path).at_resolution(RES)
    table = d / "t.csv"
    write_synthetic(table, space.block_signatures(), [c for _, c in space.sample(4, seed=1)], resolution=RES)
    fit(table).save(predictor_path(table))
    out = d / "sn"
    p = subprocess.run([sys.executable, "-m", "archlab.cli", "supernet", "train", str(space_path), "--dataset", "synthetic",
                        "--image-size", "8", "--classes", "3", "--per-class", "8", "--val-per-class", "4", "--proxy",
                        "smoke", "--steps", "3", "--batch", "4", "--width-mult", "0.25", "--val-images", "8",
                        "--cpus-per-trial", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return space_path, table, out, p


def test_supernet_train_runs_as_a_ray_trial_and_says_so(trained):
    space_path, table, out, p = trained
    assert "supernet: step 3/3: training loss largest" in p.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 3 and result["threads"] == 1
    assert f"{out}: trained 3 steps" in p.stdout and "largest sub-net: val_loss" in p.stdout and "archlab supernet eval" in p.stdout


def test_supernet_eval_scores_a_ladder_and_refuses_a_design_outside(trained, tmp_path, capsys):
    from archlab.cli import main

    space_path, table, out, _ = trained
    space = load_space(space_path)
    inside, outside = space.sample(2, seed=0)[0][1], space.base.with_values({"stages.1.expansion": 3})
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(yaml.safe_dump({"name": "l", "base": inside.to_dict(),
                                      "rows": [{"name": "a"}, {"name": "b", "set": {"stages.1.ffn_ratio": 4}}]}))
    assert main(["supernet", "eval", str(out), str(ladder), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["name"] for r in rows] == ["a", "b"] and all(r["val_loss"] > 0 for r in rows)
    bad = tmp_path / "outside.yaml"
    bad.write_text(outside.to_yaml())
    assert main(["supernet", "eval", str(out), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "down.1.0.res: expansion=3 is more than the supernet holds" in err


def test_search_with_the_supernet_evaluator_scores_and_retrains(trained, tmp_path):
    import pandas as pd

    from archlab.search import Candidates

    from test_latency_predictor import RES

    space_path, table, out, _ = trained
    space = load_space(space_path).at_resolution(RES)
    every = sorted(Candidates(space_path, table, 1.0).predictor.predict_many([c for _, c in space.sample(16, seed=0)]))
    budget = every[len(every) // 2]
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "archlab.cli", "search", "--evaluator", "supernet", "--supernet", str(out),
                        "--space", str(space_path), "--table", str(table), "--budget-ms", str(budget), "--trials", "12",
                        "--eval-images", "8", "--retrain", "1", "--sampler", "random", "--dataset", "synthetic",
                        "--image-size", "8", "--classes", "3", "--per-class", "8", "--val-per-class", "4", "--steps", "2",
                        "--batch", "4", "--width-mult", "0.25", "--samples", "0", "--cpus-per-trial", "1", "--out", str(run)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "12 scored with inherited weights" in p.stdout and "1 retrained standalone" in p.stdout
    df = pd.read_csv(run / "trials.csv")
    scored = df[df["state"] == "COMPLETE"]
    assert len(scored) == 12 and (scored["predicted_ms"] <= budget).all() and scored["score_seconds"].notna().all()
    retrained = scored[scored["retrained_val_loss"].notna()]
    assert len(retrained) == 1 and retrained["val_loss"].iloc[0] == scored["val_loss"].min()  # the best inherited
    assert "retrained val loss" in (run / "summary.md").read_text() and (run / "best" / "best-1.yaml").is_file()


def test_a_supernet_of_another_space_or_a_space_too_big_is_one_line(trained, tmp_path, capsys, monkeypatch):
    from archlab import space as space_module
    from archlab.cli import main

    space_path, table, out, _ = trained
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"name": "other", "base": yaml.safe_load(space_path.read_text())["base"],
                                     "params": {"stages.1.ffn_ratio": [2, 4]}}))
    code = main(["search", "--evaluator", "supernet", "--supernet", str(out), "--space", str(other), "--table", str(table),
                 "--budget-ms", "1e9", "--trials", "2", "--dataset", "synthetic", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "holds the supernet of the space" in err
    monkeypatch.setattr(space_module, "MAX_ENUMERATION", 10)
    code = main(["supernet", "train", str(space_path), "--dataset", "synthetic", "--steps", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "to enumerate (limit 10)" in err


def test_an_inherited_search_stopped_while_scoring_resumes_with_every_score_kept(trained, tmp_path, monkeypatch):
    import pandas as pd

    from archlab.search import SearchSettings, run_search
    from archlab.supernet import Supernet

    space_path, table, out, _ = trained
    settings = SearchSettings(space=str(space_path), table=str(table), budget_ms=1e9, trials=10, sampler="tpe",
                              evaluator="supernet", supernet=str(out), eval_images=8, cpus_per_trial=1,
                              data={"spec": "synthetic", "resolution": 8, "classes": 3, "per_class": 8,
                                    "val_per_class": 4, "seed": 0})
    real, calls = Supernet.score, []

    def stop_on_the_sixth(self, cfg, images=None):
        calls.append(cfg.name)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(self, cfg, images)

    monkeypatch.setattr(Supernet, "score", stop_on_the_sixth)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_search(settings, run)
    monkeypatch.setattr(Supernet, "score", real)
    summary = run_search(None, run, resume=True)
    df = pd.read_csv(run / "trials.csv")
    assert summary["inherited"]["scored"] == 10 and (df["state"] == "COMPLETE").sum() == 10
    assert summary["interrupted"] == 1 and df["state"].tolist()[5] == "FAIL"  # the 6th: stopped, not lost or counted
