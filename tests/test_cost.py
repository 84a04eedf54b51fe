import pytest
import torch

from archlab.config import ArchConfig
from archlab.cost import block_cost, count_macs, ladder_cost, network_cost
from archlab.verdict import Verdict, direction
from archlab.decompose import BlockSpec, decompose
from archlab.ladder import load_ladder
from archlab.models import UNet
from conftest import LADDER, tiny_dict

VARIANTS = [
    {},
    dict(attention=dict(head_dim=16, qk_norm=True, rope=True),
         conditioning=dict(context_dim=24, context_len=5, first_stage=0, inject="replace"),
         stage_defaults=dict(res_blocks=1, conv="separable", expansion=2, kv_heads="mqa", ffn_ratio=3,
                             ffn_activation="gelu")),
]


@pytest.mark.parametrize("over", VARIANTS)
def test_block_sum_equals_whole_model_fvcore(over):
    cfg = ArchConfig.from_dict(tiny_dict(**over))
    model = UNet(cfg).eval()
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 5, 24)
    cost = network_cost(cfg)
    with torch.no_grad():
        whole = count_macs(model, (x, t, ctx))
    assert cost.macs == whole
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.flops == 2 * cost.macs


def test_attention_macs_follow_the_formula():
    spec = BlockSpec("transformer", (("dim", 64), ("heads", 4), ("kv_heads", 1), ("self_attention", True),
                                     ("cross_attention", False), ("context_dim", 8), ("context_len", 3),
                                     ("ffn_ratio", 2), ("ffn_activation", "gelu"), ("qk_norm", False),
                                     ("rope", False)), (4, 4))
    n, c, d, kv = 16, 64, 16, 1
    linear = n * (c * c + 2 * c * kv * d + c * c) + n * (c * 2 * c + 2 * c * c)  # q,k,v,o + FFN
    sdpa = 4 * n * n * d * 2  # q.k^T and attn.v for 4 heads
    norms = 2 * 5 * n * c  # two LayerNorms, fvcore's 5 per element
    assert block_cost(spec).macs == linear + sdpa + norms


def test_cost_is_cached_by_signature(tiny):
    """Two equal blocks at different places (different objects, different names) share one cost."""
    pairs = [(a, b) for i, a in enumerate(decompose(tiny)) for b in decompose(tiny)[i + 1:]
             if a.signature == b.signature and a.name != b.name]
    a, b = pairs[0]
    assert a is not b and block_cost(a) is block_cost(b)
    other = next(s for s in decompose(tiny) if s.signature != a.signature)
    assert block_cost(other) is not block_cost(a)


def test_direction_ignores_tiny_changes():
    assert direction(100, 100.2) == 0 and direction(100, 90) == -1 and direction(100, 101) == 1


@pytest.fixture(scope="module")
def ladder_rows():
    return ladder_cost(load_ladder(LADDER))


def test_baseline_params_close_to_paper(ladder_rows):
    base = ladder_rows[0]
    assert abs(base.params / 1e6 - 741) / 741 < 0.10


def test_ladder_directions_match_the_paper(ladder_rows):
    for r in ladder_rows[2:6]:
        assert r.changes[0].verdict is Verdict.AGREE, r.name  # params
    for r in ladder_rows[1:6]:
        assert r.changes[1].verdict is Verdict.AGREE, r.name  # MACs


def test_every_disagreement_is_explained(ladder_rows):
    for r in ladder_rows[1:]:
        for c in r.changes:
            assert c.verdict is not Verdict.DISAGREE or not c.reason.startswith("no reason recorded"), (r.name, c)


def test_paper_scale_directions_from_the_facts(ladder_rows):
    p = {r.name: r for r in ladder_rows}
    assert p["separable-conv"].params < p["no-highres-sa"].params
    assert p["expansion-2"].macs > p["separable-conv"].macs
    assert p["mqa"].params < p["ffn-3"].params
    drop = 1 - p["no-highres-sa"].macs / p["baseline"].macs
    assert 0.10 < drop < 0.25  # paper: FLOPs -17.5%
