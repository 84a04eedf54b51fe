"""Block kinds: everything the lab knows about one kind of block, described once.

A `Kind` says what a block of that kind is made of (its hyper-parameters, in the canonical order its
key lists them), how to build it (the torch module, imported only when built), what it takes as
example inputs (what cost accounting traces and the latency lab exports), how a network runs it
(its `role`), and which cost features beyond the common ones (one call, MACs, weights, activation
elements) its latency model is fitted on, and how its choices share weights in a supernet (its
`Nesting`). The decomposition, the builder, the cost accounting, the ONNX export, the networks, the
latency predictor and the supernet all read it from `KINDS`; a new kind is one entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# example inputs: (hyper-parameters, (h, w), randn(*shape), rand(*shape)) -> (positional tensors, bound keyword
# arguments); randn and rand draw seeded tensors with the batch dimension in front
Inputs = Callable[[dict, tuple[int, int], Callable, Callable], tuple[tuple, dict]]
# extra latency features: (hyper-parameters, (h, w)) -> {name: value in millions}
Features = Callable[[dict, tuple[int, int]], dict[str, float]]


@dataclass(frozen=True)
class Nesting:
    """How the blocks of one kind at one position of a supernet share weights (archlab.elastic).

    A parameter is shared, under its name, by every variant of the position that has it. `sliced`
    hyper-parameters change its shape, and a smaller value takes the leading slice of the largest
    value's weight (the first K/V heads, the first hidden channels, the first heads and channels of a
    narrower width); `shared` ones only add or remove sub-modules, or change no weight (self-attention
    on/off, standard or separable convs, full attention or ASSA). Any other hyper-parameter gets its own
    copy of the weights per value (a choice that does not nest: the patch size), and so do parameters
    under an `own` prefix for the hyper-parameters listed (SnapGen++ keeps norms and modulation per
    width). `halves(hp)` names parameters laid out as two concatenated halves (GEGLU's value and gate),
    sliced half by half."""
    sliced: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    own: tuple[tuple[str, tuple[str, ...]], ...] = ()
    halves: Callable[[dict], tuple[str, ...]] = lambda hp: ()


def _geglu(hp: dict) -> tuple[str, ...]:
    return ("ff.proj_in.",) if hp["ffn_activation"] == "geglu" else ()


@dataclass(frozen=True)
class Kind:
    name: str
    hp: tuple[str, ...]  # the hyper-parameters, in the canonical order of keys and signatures
    module: str  # "package.module:factory" building the torch module from the hyper-parameters
    inputs: Inputs
    role: str  # how a network runs it: UNet: time, map (one tensor in, one out), res, tokens_in, tokens, tokens_out;
    # DiT: time, patchify, dit, resample, fuse, final
    bools: frozenset[str] = frozenset()  # hyper-parameters written 1/0 in keys
    features: Features | None = None
    nesting: Nesting = Nesting()  # default: no choice nests (a copy of the weights per hyper-parameter value)

    def build(self, **hp: Any):
        module, _, factory = self.module.partition(":")
        return getattr(importlib.import_module(module), factory)(**hp)


def _map(p, hw, randn, rand):  # one feature map in
    return (randn(p.get("cin", p.get("dim", p.get("channels"))), *hw),), {}


def _transformer_inputs(p, hw, randn, rand):
    tokens = randn(hw[0] * hw[1], p["dim"])
    if p["cross_attention"]:
        return (tokens, randn(p["context_len"], p["context_dim"])), {"hw": hw}
    return (tokens,), {"hw": hw, "context": None}


def _attention_features(p, n: int, keys_per_query: float, cross_attention: bool) -> dict[str, float]:
    """Attention-score elements of self- and cross-attention, and the RoPE and QK-norm work."""
    return {"attn_sa": p["heads"] * n * keys_per_query / 1e6,
            "attn_ca": p["heads"] * n * p["context_len"] / 1e6 if cross_attention else 0.0,
            "rope": n * p["dim"] / 1e6 if p["rope"] else 0.0,
            "qk_norm": n * p["dim"] / 1e6 if p["qk_norm"] else 0.0}


def _transformer_features(p, hw):
    n = hw[0] * hw[1]
    return _attention_features(p, n, n if p["self_attention"] else 0, p["cross_attention"])


def _dit_keys_per_query(p, n: int) -> float:
    """Full attention: every token; ASSA: the compressed grid (n/4) plus the gathered neighbourhood."""
    if p["attention"] == "full":
        return n
    return n / 4 + (2 * p["radius"] + 1) ** 2 * p["block"] ** 2


def _dit_inputs(p, hw, randn, rand):
    tokens = randn(hw[0] * hw[1], p["dim"])
    return (tokens, randn(p["temb_dim"]), randn(p["context_len"], p["context_dim"])), {"hw": hw}


def _tokens(width: str):
    """Example inputs of a block that takes the token grid: (tokens of `width` channels,), hw."""
    return lambda p, hw, randn, rand: ((randn(hw[0] * hw[1], p[width]),), {"hw": hw})


_B, _D = "archlab.blocks:", "archlab.blocks_dit:"
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("time_embed", ("freq_dim", "dim"), _B + "TimestepEmbedding",
         lambda p, hw, randn, rand: ((rand() * 1000,), {}), "time"),  # timesteps in [0, 1000)
    Kind("conv_in", ("cin", "cout"), _B + "conv_in", _map, "map"),
    Kind("res", ("cin", "cout", "temb_dim", "conv", "expansion", "groups"), _B + "ResBlock",
         lambda p, hw, randn, rand: ((randn(p["cin"], *hw), randn(p["temb_dim"])), {}), "res",
         nesting=Nesting(sliced=("expansion",), shared=("conv",))),
    Kind("attn_in", ("dim", "groups"), _B + "AttnIn", _map, "tokens_in"),
    Kind("transformer", ("dim", "heads", "kv_heads", "self_attention", "cross_attention", "context_dim", "context_len",
                         "ffn_ratio", "ffn_activation", "qk_norm", "rope"), _B + "transformer", _transformer_inputs,
         "tokens", frozenset({"self_attention", "cross_attention", "qk_norm", "rope"}), _transformer_features,
         Nesting(sliced=("kv_heads", "ffn_ratio"), shared=("self_attention", "cross_attention", "qk_norm", "rope"),
                 halves=_geglu)),
    Kind("attn_out", ("dim",), _B + "AttnOut",
         lambda p, hw, randn, rand: ((randn(hw[0] * hw[1], p["dim"]), randn(p["dim"], *hw)), {}), "tokens_out"),
    Kind("down", ("channels",), _B + "Downsample", _map, "map"),
    Kind("up", ("channels",), _B + "Upsample", _map, "map"),
    Kind("conv_out", ("cin", "cout", "groups"), _B + "ConvOut", _map, "map"),
    # the DiT family (archlab.blocks_dit); `hw` of a token block is its token grid
    Kind("patch_embed", ("cin", "dim", "patch"), _D + "PatchEmbed", _map, "patchify", nesting=Nesting(sliced=("dim",))),
    Kind("dit", ("dim", "heads", "kv_heads", "temb_dim", "context_dim", "context_len", "ffn_ratio", "ffn_activation",
                 "qk_norm", "rope", "attention", "block", "radius"), _D + "dit_block", _dit_inputs, "dit",
         frozenset({"qk_norm", "rope"}),
         lambda p, hw: _attention_features(p, hw[0] * hw[1], _dit_keys_per_query(p, hw[0] * hw[1]), True),
         Nesting(sliced=("dim", "heads", "kv_heads", "ffn_ratio"), shared=("qk_norm", "rope", "attention", "block", "radius"),
                 own=(("modulation.", ("dim",)), ("norm2.", ("dim",))), halves=_geglu)),
    Kind("resample", ("dim_in", "dim_out", "direction", "factor"), _D + "TokenResample", _tokens("dim_in"), "resample",
         nesting=Nesting(sliced=("dim_in", "dim_out"))),
    Kind("fuse", ("cin", "cout"), _D + "fuse",
         lambda p, hw, randn, rand: ((randn(hw[0] * hw[1], p["cin"]),), {}), "fuse"),
    Kind("final", ("dim", "cout", "patch", "temb_dim"), _D + "FinalLayer",
         lambda p, hw, randn, rand: ((randn(hw[0] * hw[1], p["dim"]), randn(p["temb_dim"])), {"hw": hw}), "final",
         nesting=Nesting(sliced=("dim",), own=(("modulation.", ("dim",)),))),
)}


def canonical(kind: str, hp) -> tuple[tuple[str, Any], ...]:
    """A kind's hyper-parameters in its canonical order (a kind the lab does not know keeps its order;
    missing or unknown names are left for the caller to refuse, with the kind's list)."""
    pairs = tuple(hp.items()) if isinstance(hp, dict) else tuple(hp)
    k = KINDS.get(kind)
    if k is None or {n for n, _ in pairs} != set(k.hp):
        return pairs
    values = dict(pairs)
    return tuple((n, values[n]) for n in k.hp)
