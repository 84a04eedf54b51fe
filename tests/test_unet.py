import pytest
import torch

from archlab.config import ArchConfig, with_width
from archlab.decompose import decompose
from archlab.ladder import load_ladder
from archlab.space import load_space
from archlab.models import UNet
from conftest import LADDER, SPACE, tiny_dict


def _run(cfg: ArchConfig, batch: int = 2, res: int | None = None) -> torch.Tensor:
    res = res or cfg.latent.resolution
    model = UNet(cfg)
    x = torch.randn(batch, cfg.latent.channels, res, res)
    t = torch.rand(batch) * 1000
    ctx = torch.randn(batch, cfg.conditioning.context_len, cfg.conditioning.context_dim)
    return model, x, model(x, t, ctx)


def _small(cfg: ArchConfig, width: float = 0.125, res: int = 16) -> ArchConfig:
    cfg = with_width(cfg, width).with_values({"latent.resolution": res, "conditioning.context_dim": 32,
                                              "conditioning.context_len": 4})
    return cfg


@pytest.mark.parametrize("row", range(8))
def test_every_ladder_row_builds_and_keeps_the_latent_shape(row):
    cfg = _small(load_ladder(LADDER).rows[row].config)
    model, x, y = _run(cfg, res=16)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_random_samples_from_the_space_build_and_run():
    space = load_space(SPACE)
    for point, cfg in space.sample(4, seed=7):
        model, x, y = _run(_small(cfg), batch=1)
        assert y.shape == x.shape and torch.isfinite(y).all(), point


def test_resolution_agnostic_forward(tiny):
    model = UNet(tiny)
    for res in (8, 16, 32):
        x = torch.randn(1, 4, res, res)
        assert model(x, torch.tensor([10.0]), torch.randn(1, 5, 24)).shape == x.shape


def test_gradients_reach_every_parameter():
    cfg = ArchConfig.from_dict(tiny_dict(
        attention=dict(head_dim=16, qk_norm=True, rope=True),
        conditioning=dict(context_dim=24, context_len=5, first_stage=0, inject="replace"),
        stage_defaults=dict(res_blocks=2, conv="separable", expansion=2, kv_heads="mqa", ffn_ratio=3)))
    model, x, y = _run(cfg)
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_unet_is_built_from_exactly_the_decomposition(tiny):
    model = UNet(tiny)
    specs = decompose(tiny)
    assert [s.name.replace(".", "_") for s in specs] == list(model.blocks.keys())
    for spec, block in zip(specs, model.blocks.values()):
        assert sum(p.numel() for p in block.parameters()) == sum(p.numel() for p in spec.build().parameters())


def test_skip_stack_balances_and_up_path_has_one_more_layer(tiny):
    specs = decompose(tiny)
    assert sum(s.skip == "push" for s in specs) == sum(s.skip == "pop" for s in specs)
    ups = [s for s in specs if s.kind == "res" and s.name.startswith("up.")]
    downs = [s for s in specs if s.kind == "res" and s.name.startswith("down.")]
    assert len(ups) == len(downs) + tiny.n_stages


def test_early_conditioning_variants(tiny):
    base = tiny.with_values({"conditioning.first_stage": 0})
    add = [s for s in decompose(base) if s.stage == 0]
    rep = [s for s in decompose(base.with_values({"conditioning.inject": "replace"})) if s.stage == 0]
    ca_blocks = [s for s in add if s.kind == "transformer"]
    assert ca_blocks and all(s.params()["cross_attention"] and not s.params()["self_attention"] for s in ca_blocks)
    down_res = lambda specs: [s for s in specs if s.kind == "res" and s.name.startswith("down.")]
    assert len(down_res(add)) == 1 and len(down_res(rep)) == 0  # replace turns the res block into CA+FFN
    assert sum(s.kind == "transformer" for s in rep) == sum(s.kind == "transformer" for s in add)
    # stages before first_stage get no cross-attention; their own transformers keep self-attention
    late = tiny.with_values({"conditioning.first_stage": 2})
    st1 = [s for s in decompose(late) if s.stage == 1 and s.kind == "transformer"]
    assert st1 and all(not s.params()["cross_attention"] and s.params()["self_attention"] for s in st1)


def test_missing_context_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="context"):
        UNet(tiny)(torch.randn(1, 4, 16, 16), torch.tensor([1.0]))
