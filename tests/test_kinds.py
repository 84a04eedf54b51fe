"""Block kinds are described once (archlab.kinds): every block a network has is a registered kind, in its
canonical hyper-parameter order; a key written in another order is the same block; every kind builds and
runs on its own example inputs."""

import torch

from archlab.decompose import BlockSpec, decompose
from archlab.kinds import KINDS
from archlab.ladder import load_ladder
from archlab.space import load_space
from conftest import LADDER, ROOT


def test_every_block_is_a_registered_kind_in_canonical_order():
    cfgs = [r.config for r in load_ladder(LADDER).rows]
    cfgs += [r.config for r in load_ladder(ROOT / "search_spaces" / "snapgenpp_ablation.yaml").rows]
    cfgs += [c for _, c in load_space(ROOT / "search_spaces" / "snapgen_unet.yaml").sample(50, seed=4)]
    cfgs += [c for _, c in load_space(ROOT / "search_spaces" / "snapgen_dit.yaml").sample(20, seed=4)]
    seen = set()
    for cfg in cfgs:
        for b in decompose(cfg):
            assert tuple(k for k, _ in b.hp) == KINDS[b.kind].hp, b.key
            seen.add(b.kind)
    assert seen == set(KINDS)  # and every registered kind occurs


def test_a_key_in_another_order_is_the_same_block():
    b = next(b for b in decompose(load_ladder(LADDER).rows[-1].config) if b.kind == "transformer")
    shuffled = f"{b.kind}(" + ",".join(reversed(b.key[b.key.index("(") + 1:b.key.index(")")].split(","))) + ")@" \
        + b.key.split("@")[1]
    assert shuffled != b.key and BlockSpec.from_key(shuffled).signature == b.signature


def test_every_kind_builds_and_runs_on_its_example_inputs():
    small = {"width_mult": 0.0625, "latent.resolution": 16}
    unet = load_ladder(LADDER).rows[-1].config.with_values(small)
    dit = load_ladder(ROOT / "search_spaces" / "snapgenpp_ablation.yaml").rows[-1].config.with_values(small)
    blocks = decompose(unet) + decompose(dit)
    for kind in KINDS:
        spec = next(b for b in blocks if b.kind == kind)
        module, inputs = spec.runnable()
        with torch.no_grad():
            out = module(*inputs)
        assert torch.isfinite(out).all(), kind
