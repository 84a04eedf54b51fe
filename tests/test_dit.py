"""The DiT family (SnapGen++): its config, decomposition, model, cost, export, space and training."""

import json

import pytest
import torch

from archlab import train as T
from archlab.config import ArchConfig, DiTConfig, arch_from_dict
from archlab.cost import count_macs, network_cost
from archlab.data import DataConfig, load_dataset
from archlab.decompose import BlockSpec, decompose
from archlab.errors import ArchlabError
from archlab.ladder import load_ladder
from archlab.models import build_model
from archlab.space import load_space
from conftest import tiny_dict


def dit_dict(**over) -> dict:
    d = dict(family="dit", name="tiny-dit", latent=dict(channels=4, resolution=16), patch=2, time_embed_dim=32,
             freq_dim=32, attention=dict(head_dim=16, qk_norm=True, rope=True),
             conditioning=dict(context_dim=24, context_len=5),
             stages=[dict(channels=32, depth=2, attention="assa", kv_heads="mqa"), dict(channels=48, depth=3),
                     dict(channels=32, depth=2, attention="assa", block=2)])
    d.update(over)
    return d


def inputs(cfg, batch=2):
    g = torch.Generator().manual_seed(0)
    res, c = cfg.latent.resolution, cfg.conditioning
    return (torch.randn(batch, cfg.latent.channels, res, res, generator=g), torch.tensor([10.0, 500.0][:batch]),
            torch.randn(batch, c.context_len, c.context_dim, generator=g))


def test_config_round_trips_and_names_its_family():
    cfg = arch_from_dict(dit_dict())
    assert isinstance(cfg, DiTConfig) and cfg.tokens == 8 and cfg.grid(1) == 4
    d = cfg.to_dict()
    assert d["family"] == "dit" and arch_from_dict(json.loads(json.dumps(d))) == cfg
    unet = arch_from_dict(tiny_dict())
    assert isinstance(unet, ArchConfig) and "family" not in unet.to_dict()  # the UNet's digests predate families
    assert arch_from_dict({**tiny_dict(), "family": "unet"}) == unet
    assert cfg.with_values({"stages.*.kv_heads": "mqa", "skips": "dense"}).stages[1].kv_heads == "mqa"


@pytest.mark.parametrize("override, message", [
    (dict(family="vit"), "family: 'vit' is not one of unet, dit"),
    (dict(stages=[dict(channels=32)] * 2), "a DiT has three stages"),
    (dict(patch=3), "patch: 3 does not divide latent.resolution 16"),
    (dict(latent=dict(channels=4, resolution=12)), "stages[0].block: ASSA needs the down stage's 6x6 token grid"),
    (dict(skips="both"), "skips: 'both' is not one of none, u, dense"),
    (dict(middle_stride=4), "middle_stride: 4 is not one of 1, 2"),
    (dict(stages=[dict(channels=32, depth=0), dict(channels=48), dict(channels=32)], skips="u"), "Down stage needs depth >= 1"),
    (dict(stages=[dict(channels=40), dict(channels=48), dict(channels=32)]), "40 is not divisible by attention.head_dim 16"),
])
def test_bad_config_is_one_line_naming_the_field(override, message):
    with pytest.raises(ArchlabError) as e:
        arch_from_dict(dit_dict(**override), where="x.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("skips, stride", [("none", 2), ("u", 2), ("dense", 2), ("dense", 1)])
def test_model_is_its_blocks_and_costs_add_up_to_fvcore_on_the_whole(skips, stride):
    cfg = arch_from_dict(dit_dict(skips=skips, middle_stride=stride))
    model = build_model(cfg).eval()
    specs = decompose(cfg)
    names = [s.name for s in specs]
    assert names[:3] == ["time_embed", "patch_embed", "down.0"] and names[-1] == "final"
    assert ("up.fuse" in names) == (skips == "u")
    assert [n for n in names if n.startswith("middle.") and n.endswith(".fuse")] == (["middle.2.fuse"] if skips == "dense" else [])
    assert ("down.resample" in names) == (stride == 2 or cfg.channels(0) != cfg.channels(1))
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        assert model(x, t, ctx).shape == x.shape
    cost = network_cost(cfg)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.macs == count_macs(model, (x[:1], t[:1], ctx[:1]))  # the block sums are the whole model


def test_every_block_of_the_model_is_used_and_learns():
    cfg = arch_from_dict(dit_dict(skips="dense"))
    model = build_model(cfg)
    for m in model.modules():  # adaLN-Zero starts every block as the identity: open the gates
        if hasattr(m, "modulation"):
            torch.nn.init.normal_(m.modulation[-1].weight, std=0.1)
    x, t, ctx = inputs(cfg)
    model(x, t, ctx).pow(2).mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused


def test_full_attention_blocks_have_one_signature_whatever_their_tile_settings():
    a = arch_from_dict(dit_dict())
    b = a.with_values({"stages.1.block": 8, "stages.1.radius": 2})  # the middle stage has full attention
    assert [s.signature for s in decompose(a)] == [s.signature for s in decompose(b)]
    dit = next(s for s in decompose(a) if s.name == "middle.0")
    assert BlockSpec.from_key(dit.key) == dit and dit.params()["block"] == 0


def test_network_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from archlab.latency.export import export_bundle

    cfg = arch_from_dict(dit_dict(skips="dense"))
    manifest = export_bundle(tmp_path, [], [cfg], resolution=16, name="dit")
    item = manifest["items"][-1]
    x, t, ctx = inputs(cfg, batch=1)
    sess = ort.InferenceSession(str(tmp_path / item["file"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"in0": x.numpy(), "in1": torch.tensor([500.0]).numpy(), "in2": ctx.numpy()})[0]
    with torch.no_grad():
        ref = build_model(cfg).eval()
    # export_bundle built its own model: compare shapes and finiteness, and the block list it came from
    assert out.shape == tuple(x.shape) and torch.isfinite(torch.from_numpy(out)).all()
    assert item["config"]["family"] == "dit" and arch_from_dict(item["config"]) == cfg
    assert ref(x, torch.tensor([500.0]), ctx).shape == x.shape


def test_space_enumerates_every_block_its_points_can_have(tmp_path):
    import yaml

    space = {"name": "dit-space", "base": dit_dict(), "params": {
        "stages.0.depth": [1, 2], "stages.1.channels": [32, 48], "stages.0.attention": ["full", "assa"],
        "stages.2.kv_heads": ["mhsa", "mqa"], "skips": ["none", "u", "dense"], "stages.1.ffn_ratio": [2, 4]}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    sp = load_space(path)
    known = {s.signature for s in sp.block_signatures()}
    for _, cfg in sp.sample(20, seed=1):
        assert {s.signature for s in decompose(cfg)} <= known


def test_ladder_row_can_switch_family(tmp_path):
    import yaml

    ladder = {"name": "mixed", "base": tiny_dict(), "rows": [
        {"name": "unet"}, {"name": "dit", "config": dit_dict()}, {"name": "dit-u", "set": {"skips": "u"}}]}
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(ladder))
    rows = load_ladder(path).rows
    assert [type(r.config).__name__ for r in rows] == ["ArchConfig", "DiTConfig", "DiTConfig"]
    assert rows[2].config.skips == "u" and rows[1].config.name == "dit"


def test_proxy_training_runs_on_a_dit():
    data = load_dataset(DataConfig("synthetic", resolution=8, classes=3, per_class=8, val_per_class=4))
    t = T.TrainConfig(steps=3, batch=4, width_mult=0.5, context_dim=8, context_len=2, samples=0, val_images=8,
                      report_every=1, checkpoint_every=3, warmup=1)
    cfg = arch_from_dict(dit_dict(stages=[dict(channels=32, depth=1, attention="assa", block=2), dict(channels=32, depth=1),
                                          dict(channels=32, depth=1, attention="assa", block=2)]))
    r = T.train(cfg, data, t)
    classes = (data.num_classes + 1) * t.context_len * t.context_dim  # the class tokens' embedding
    assert r.status == "ok" and r.steps == 3 and r.val_loss > 0
    assert r.params == network_cost(T.proxy_arch(cfg, 8, t)).params + classes


def test_snapgenpp_ladder_costs_like_the_paper_or_says_why():
    """Rows 1-3 (the DiTs up to ASSA) within 5% of the paper's params; the last row's gap is explained."""
    from conftest import ROOT

    from archlab.cost import ladder_cost

    ladder = load_ladder(ROOT / "search_spaces" / "snapgenpp_ablation.yaml")
    rows = ladder_cost(ladder)
    assert [r.name for r in rows] == ["snapgen-unet", "dit-mqa-ffn3", "three-stage", "assa", "enhanced"]
    for r in rows:
        gap = r.params / 1e6 / r.paper["params_m"] - 1
        assert abs(gap) < 0.05 or "params" in r.why_differs, (r.name, gap)
    assert all(abs(r.params / 1e6 / r.paper["params_m"] - 1) < 0.05 for r in rows[:4])
    assert rows[3].macs < rows[2].macs < rows[1].macs  # three stages, then ASSA, cut the work
    assert [ch.verdict.value for ch in rows[3].changes] == ["agree", "none"]  # params; the paper gives no FLOPs


def test_the_enhancements_ladder_splits_the_last_snapgenpp_step():
    """snapgenpp_enhancements.yaml starts at the main ladder's ASSA row and ends at its enhanced row, one
    change a row, so its trainings pair with the main ladder's."""
    from conftest import ROOT

    main = load_ladder(ROOT / "search_spaces" / "snapgenpp_ablation.yaml")
    steps = load_ladder(ROOT / "search_spaces" / "snapgenpp_enhancements.yaml")
    assert steps.rows[0].config.digest() == main.row("assa").config.digest()
    assert steps.rows[-1].config.digest() == main.row("enhanced").config.digest()
    assert len({r.config.digest() for r in steps.rows}) == len(steps.rows) == 5


def test_search_runs_end_to_end_on_a_dit_space(tmp_path):
    """`archlab search` on a DiT space: candidates costed by a (synthetic) table of DiT blocks, trained on
    Ray, the best exported as a DiT config."""
    import subprocess
    import sys

    import yaml

    from archlab.latency.predictor import fit, predictor_path
    from test_latency_predictor import write_synthetic

    base = dit_dict(latent=dict(channels=4, resolution=8), stages=[
        dict(channels=32, depth=1, attention="assa", block=2), dict(channels=32, depth=1),
        dict(channels=32, depth=1, attention="assa", block=2)])
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump({"name": "tiny-dit", "base": base, "params": {
        "stages.1.depth": [1, 2], "skips": ["none", "dense"], "stages.0.attention": ["full", "assa"]}}))
    space = load_space(space_path)
    table = tmp_path / "t.csv"
    write_synthetic(table, space.block_signatures(), [c for _, c in space.sample(4, seed=1)], resolution=8)
    fit(table).save(predictor_path(table))
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "archlab.cli", "search", "--space", str(space_path), "--table",
                           str(table), "--budget-ms", "1000", "--trials", "2", "--dataset", "synthetic",
                           "--image-size", "8", "--classes", "3", "--per-class", "8", "--val-per-class", "4",
                           "--steps", "3", "--batch", "4", "--width-mult", "1", "--samples", "0", "--cpus-per-trial",
                           "1", "--out", str(run)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    best = arch_from_dict(yaml.safe_load((run / "best" / "best-1.yaml").read_text()))
    assert isinstance(best, DiTConfig) and best.name.startswith("tiny-dit-trial")
