"""A weight-shared supernet: every block a family of networks can put at each position, held once.

`Elastic(variants)` holds, for each position (a block's `name` in the decomposition) and each of its
parameters, one weight large enough for every variant of the block there; each kind's `Nesting`
(archlab.kinds) says which hyper-parameters take a leading slice of it (expansion, FFN ratio, K/V
heads, width) and which get a copy per value (a choice that does not nest, e.g. the patch size).

A sub-network is an ordinary config (at the supernet's scale): `activate(cfg)` makes `forward` run it
through its family's own forward pass (`archlab.models.run_unet` / `run_dit`) over the blocks' own
modules with sliced weights, and `extract(cfg)` returns its weights as the state dict of
`build_model(cfg)`, which then computes exactly what the supernet computes with `cfg` active. A skipped
block (a shallower depth, no self-attention) is absent from the sub-network's decomposition: the
identity. A config the supernet does not hold is one `ArchlabError` line naming the block and value.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Sequence

import torch
from torch import nn

from archlab.config import Config, DiTConfig
from archlab.decompose import BlockSpec, decompose, format_value as _fmt
from archlab.errors import ArchlabError
from archlab.kinds import KINDS
from archlab.models import module_name, run_dit, run_unet


@functools.lru_cache(maxsize=1 << 14)
def _skeleton(spec: BlockSpec) -> tuple[nn.Module, tuple[tuple[str, tuple[int, ...]], ...]]:
    """The block's module without memory (meta device) and its parameters' names and shapes."""
    with torch.device("meta"):
        module = spec.build()
    if next(module.buffers(), None) is not None:
        raise ArchlabError(f"{spec.kind}: a block with buffers cannot be weight-shared")
    return module, tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def param_count(cfg: Config) -> int:
    """Parameters of the network of `cfg` (exact, from the blocks' shapes; nothing is built)."""
    return sum(_numel(shape) for spec in decompose(cfg) for _, shape in _skeleton(spec)[1])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def weight_key(spec: BlockSpec, param: str) -> str:
    """Which weight of the supernet a block's parameter is a slice of: its position, its name, and the
    values of the hyper-parameters that do not nest (each value has its own copy)."""
    nest = KINDS[spec.kind].nesting
    hp = spec.params()
    own = [k for k in KINDS[spec.kind].hp if k not in nest.sliced and k not in nest.shared]
    for prefix, names in nest.own:
        if param.startswith(prefix):
            own += [n for n in names if n not in own]
    return f"{spec.name}:{spec.kind}:{param}" + "".join(f"|{k}={_fmt(hp[k])}" for k in own)


def take(weight: torch.Tensor, shape: tuple[int, ...], halves: bool = False) -> torch.Tensor:
    """The leading `shape` slice of `weight` (a view); `halves`: dim 0 is two halves, sliced each."""
    rest = tuple(slice(0, n) for n in shape[1:])
    if not halves:
        return weight[(slice(0, shape[0]), *rest)]
    big, small = weight.shape[0] // 2, shape[0] // 2
    return torch.cat([weight[(slice(0, small), *rest)], weight[(slice(big, big + small), *rest)]])


def _halves(spec: BlockSpec, param: str) -> bool:
    return any(param.startswith(p) for p in KINDS[spec.kind].nesting.halves(spec.params()))


class Elastic(nn.Module):
    """The supernet of `variants` ({position: the blocks seen there}) of one family (`dit` or `unet`).
    `seed` draws the initial weights: each weight from the first variant that has it at full size, built
    with torch's usual initialisers under a generator seeded by (seed, weight key)."""

    def __init__(self, family: str, variants: dict[str, list[BlockSpec]], seed: int = 0):
        super().__init__()
        self.family, self.variants = family, variants
        sources = holds(variants)
        self.keys = sorted(sources)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.weights = nn.ParameterList([nn.Parameter(w) for w in _initial(sources, seed)])
        self._held = {name: _held(specs) for name, specs in variants.items()}
        self._plans: dict[str, tuple] = {}
        self._active: tuple | None = None
        self._run = run_dit if family == "dit" else run_unet

    # ---- sub-networks ---------------------------------------------------------------------------
    def plan(self, cfg: Config) -> tuple[list[BlockSpec], list[tuple]]:
        """`cfg`'s blocks and, per block, its module and the (name, weight index, shape, halves) of
        each of its parameters; checks that the supernet holds every block (cached per config)."""
        digest = cfg.digest()
        if digest not in self._plans:
            specs = decompose(cfg)
            if (self.family == "dit") != isinstance(cfg, DiTConfig):
                raise ArchlabError(f"{cfg.name}: a {'DiT' if isinstance(cfg, DiTConfig) else 'UNet'} config, but the "
                                   f"supernet holds {'DiTs' if self.family == 'dit' else 'UNets'}")
            for spec in specs:
                self._check(cfg, spec)
            self._plans[digest] = (specs, [(_skeleton(s)[0], tuple(
                (p, self.index[weight_key(s, p)], shape, _halves(s, p)) for p, shape in _skeleton(s)[1]))
                for s in specs])
        return self._plans[digest]

    def _check(self, cfg: Config, spec: BlockSpec) -> None:
        held = self._held.get(spec.name)
        where = f"{cfg.name}: block {spec.name}"
        if held is None or spec.kind not in held:
            raise ArchlabError(f"{where} ({spec.kind}) is outside the supernet: it has no such block there")
        sliced = KINDS[spec.kind].nesting.sliced
        for k, v in spec.hp:
            values = held[spec.kind][k]
            if k in sliced and v > max(values):
                raise ArchlabError(f"{where}: {k}={_fmt(v)} is more than the supernet holds (at most {_fmt(max(values))})")
            if k not in sliced and v not in values:
                raise ArchlabError(f"{where}: {k}={_fmt(v)} is outside the supernet (it holds "
                                   f"{', '.join(sorted(map(_fmt, values)))})")
        for p, shape in _skeleton(spec)[1]:
            i = self.index.get(weight_key(spec, p))
            if i is None or any(a > b for a, b in zip(shape, self.weights[i].shape)):
                raise ArchlabError(f"{where}: its {p} {shape} is outside the supernet")

    def activate(self, cfg: Config) -> "Elastic":
        """Make `forward` run the sub-network of `cfg`."""
        self._active = self.plan(cfg)
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self._active is None:
            raise RuntimeError("Elastic.forward: activate(cfg) a sub-network first")
        specs, plan = self._active
        return self._run(specs, [self.block(module, params) for module, params in plan], x, t, context)

    def block(self, module: nn.Module, params: Sequence[tuple]):
        """One block of a plan as a callable: its module run with its slices of the supernet's weights."""
        def run(*args, **kwargs):
            weights = {p: take(self.weights[i], shape, halves) for p, i, shape, halves in params}
            return torch.func.functional_call(module, weights, args, kwargs)
        return run

    def extract(self, cfg: Config) -> dict[str, torch.Tensor]:
        """The sub-network's weights, copied, as the state dict of `build_model(cfg)`."""
        specs, plan = self.plan(cfg)
        return {f"blocks.{module_name(s)}.{p}": take(self.weights[i], shape, halves).detach().clone()
                for s, (_, params) in zip(specs, plan) for p, i, shape, halves in params}

    def __getstate__(self):  # plans hold meta modules and configs: rebuilt on demand
        return {**super().__getstate__(), "_plans": {}, "_active": None}


def holds(variants: dict[str, list[BlockSpec]]) -> dict[str, BlockSpec]:
    """Each weight of the supernet of `variants` and the first block that has it at its full size (its
    initial values come from that block); raises if no block has a weight at full size: the supernet
    cannot hold those variants. Nothing is built."""
    shapes: dict[str, tuple[int, ...]] = {}
    for specs in variants.values():
        for spec in specs:
            for param, shape in _skeleton(spec)[1]:
                old = shapes.setdefault(weight_key(spec, param), shape)
                shapes[weight_key(spec, param)] = tuple(map(max, old, shape))
    sources: dict[str, BlockSpec] = {}
    for specs in variants.values():
        for spec in specs:
            for param, shape in _skeleton(spec)[1]:
                if shapes[weight_key(spec, param)] == shape:
                    sources.setdefault(weight_key(spec, param), spec)
    missing = [k for k in shapes if k not in sources]
    if missing:
        raise ArchlabError(f"{missing[0]}: no block of the space has this weight at its largest shape "
                           f"{shapes[missing[0]]}, so the supernet cannot hold the space")
    return sources


def _initial(sources: dict[str, BlockSpec], seed: int) -> list[torch.Tensor]:
    """The initial weights (sorted by key): each from its source block, built with torch's usual
    initialisers under a generator seeded by (seed, the block's position and key)."""
    built: dict[str, dict[str, torch.Tensor]] = {}  # by position and key (equal specs at two positions differ)
    out = []
    for key in sorted(sources):
        spec = sources[key]
        where = f"{spec.name}|{spec.key}"
        if where not in built:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}|{where}".encode()).digest()[:8], "little"))
                built[where] = dict(spec.build().named_parameters())
        out.append(built[where][key.split(":", 2)[2].split("|", 1)[0]].detach().clone())
    return out


def _held(specs: list[BlockSpec]) -> dict[str, dict[str, set]]:
    """{kind: {hyper-parameter: the values the position's variants have}}."""
    out: dict[str, dict[str, set]] = {}
    for s in specs:
        for k, v in s.hp:
            out.setdefault(s.kind, {}).setdefault(k, set()).add(v)
    return out
