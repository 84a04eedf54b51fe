"""Cost accounting: exact params and fvcore MACs per block, cached by block signature, summed.

Convention: fvcore counts one multiply-add as one flop, so its totals are MACs; we report
FLOPs = 2 x MACs beside them. fvcore also charges normalisation layers (~5 per element) and
nearest upsampling (1 per output element); we add handles for scaled_dot_product_attention
(q.k^T and attn.v: 2 * B * heads * N * M * d) and rms_norm (as fvcore's layer_norm). Pure
elementwise ops (add, mul, activations, softmax inside SDPA, ...) are not MACs and are not
counted; any other op fvcore cannot count is an error, never a silent zero.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape, norm_flop_counter

from tqdm import tqdm

from archlab.config import ArchConfig
from archlab.decompose import BlockSpec, decompose
from archlab.ladder import Ladder
from archlab.verdict import MACS, PARAMS, Change, compare

CONVENTION = "MACs by fvcore (1 multiply-add = 1 MAC, plus fvcore's norm/upsample estimates); FLOPs = 2 x MACs"

# Ops that are not multiply-adds: not counted by the MAC convention.
ELEMENTWISE_OPS = frozenset(
    f"aten::{op}" for op in (
        "add", "add_", "sub", "mul", "mul_", "div", "neg", "rsub", "silu", "gelu", "sigmoid", "exp", "cos", "sin",
        "pow", "sqrt", "rsqrt", "mean", "sum", "softmax", "pad", "constant_pad_nd", "fill_", "zeros_like",
        "ones_like", "rand", "randn", "arange", "repeat_interleave", "repeat", "expand", "stack", "cat", "chunk",
        "split", "view", "reshape", "flatten", "transpose", "permute", "contiguous", "unsqueeze", "squeeze",
        "to", "type_as", "index", "index_select", "slice", "select", "clone", "floor_divide", "reciprocal",
    )
)


def _sdpa_macs(inputs, outputs) -> int:
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    *batch, n, d = q
    m, dv = k[-2], v[-1]
    b = 1
    for x in batch:
        b *= x
    return b * n * m * (d + dv)


@dataclass(frozen=True)
class BlockCost:
    params: int
    macs: int
    acts: int = 0  # elements of the block's inputs and output: a proxy for its memory traffic

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True)
class NetworkCost:
    name: str
    blocks: tuple[tuple[BlockSpec, BlockCost], ...]

    @property
    def params(self) -> int:
        return sum(c.params for _, c in self.blocks)

    @property
    def macs(self) -> int:
        return sum(c.macs for _, c in self.blocks)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def count_macs(module: torch.nn.Module, inputs: tuple) -> int:
    """fvcore MACs of one forward call, with the lab's handles; unknown ops raise."""
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.set_op_handle("aten::rms_norm", norm_flop_counter(2))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    total = analysis.total()
    unknown = sorted(set(analysis.unsupported_ops()) - ELEMENTWISE_OPS)
    if unknown:
        raise RuntimeError(f"fvcore cannot count {', '.join(unknown)}: add a handle in archlab/cost.py or list it as elementwise")
    return int(total)


def check_fits(spec: BlockSpec) -> None:
    """Refuse a block too large to build and trace here (absurd channels or resolution), before any
    memory is allocated: its parameters are counted on the meta device."""
    from archlab.errors import ArchlabError
    from archlab.io import memory_bytes

    with torch.device("meta"):
        params = sum(p.numel() for p in spec.build().parameters())
    p, (h, w) = spec.params(), spec.hw
    acts = max(p.get("cin", 0), p.get("dim", 0), p.get("channels", 0), p.get("cout", 0), 1) * h * w
    need, memory = 4 * (params + 16 * acts), memory_bytes()  # weights, and the traced activations
    if memory and need > memory / 2:
        raise ArchlabError(f"{spec.key}: about {need / 2 ** 30:,.0f} GiB to build and trace ({params:,} params), "
                           f"more than half of this machine's {memory / 2 ** 30:.1f} GiB: check the config's channels "
                           "and latent resolution")


@lru_cache(maxsize=None)
def block_cost(spec: BlockSpec) -> BlockCost:
    """Params, MACs and activation elements of one block at batch 1 (cached by signature)."""
    check_fits(spec)
    module, inputs = spec.runnable(batch=1)
    params = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        macs = count_macs(module.eval(), inputs)
        acts = sum(x.numel() for x in inputs) + module(*inputs).numel()
    return BlockCost(params, macs, acts)


def network_cost(cfg: ArchConfig) -> NetworkCost:
    return NetworkCost(cfg.name, tuple((s, block_cost(s)) for s in decompose(cfg)))


# ---- ladder tables ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostRow:
    """A ladder row's cost, the paper's numbers, and the params and MACs changes from the row above."""
    index: int
    name: str
    change: str
    params: int
    macs: int
    flops: int
    paper: dict
    why_differs: dict
    changes: tuple[Change, ...] = ()  # vs the row above (none for the first row)

    def to_dict(self) -> dict:
        return asdict(self)


def ladder_cost(ladder: Ladder, progress: bool = False) -> list[CostRow]:
    """Every row's params/MACs/FLOPs, and whether each change's direction agrees with the paper's."""
    rows: list[CostRow] = []
    for r in tqdm(ladder.rows, desc="costing", unit="row", disable=not progress, leave=False):
        c = network_cost(r.config)
        prev = rows[-1] if rows else None
        changes = () if prev is None else tuple(
            compare(m, (getattr(prev, key), getattr(c, key)), r.paper, prev.paper, r.why_differs)
            for m, key in ((PARAMS, "params"), (MACS, "macs")))
        rows.append(CostRow(r.index, r.name, r.change, c.params, c.macs, c.flops, dict(r.paper), dict(r.why_differs),
                            changes))
    return rows
