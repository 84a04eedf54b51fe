"""Search spaces: a fixed base config (UNet or DiT) plus the block-level choices a search may make.

A sampled point is a dict {dotted path: value}; `space.config(point)` turns it into a config
(the same path the Optuna binding uses). Space YAML::

    name: snapgen-unet
    base: {...}                                   # a full config: the fixed parts
    params:
      stages.1.self_attention: [true, false]      # a list: categorical choices
      stages.1.transformer_depth: {low: 1, high: 3}   # an integer range (step 1 unless `step`)
      stages.*.ffn_ratio: [2, 3, 4]               # `*`: one value shared by every stage

Each path must exist in the base config, and every single choice must give a valid config.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archlab.config import Config, arch_from_dict, read_yaml
from archlab.decompose import BlockSpec, decompose
from archlab.errors import ArchlabError
from archlab.schema import at_least, build, setting

MAX_ENUMERATION = 2_000_000  # configs decomposed by block_signatures(); beyond this, refuse


@dataclass(frozen=True)
class Param:
    path: str
    choices: tuple[Any, ...]
    int_range: tuple[int, int, int] | None = None  # (low, high, step) when given as a range

    @property
    def stage(self) -> int | None:
        """The stage a `stages.N.*` parameter belongs to; None for network-wide parameters."""
        parts = self.path.split(".")
        return int(parts[1]) if len(parts) > 2 and parts[0] == "stages" and parts[1].isdigit() else None


@dataclass(frozen=True)
class SearchSpace:
    name: str
    base: Config
    params: tuple[Param, ...]
    description: str = ""
    path: str = ""

    @functools.cached_property
    def _paths(self) -> frozenset[str]:
        return frozenset(p.path for p in self.params)

    @property
    def size(self) -> int:
        return math.prod(len(p.choices) for p in self.params)

    def config(self, point: dict[str, Any], name: str | None = None) -> Config:
        """The config of a point; raises ArchlabError if the combination is invalid."""
        if not self._paths.issuperset(point):
            unknown = sorted(set(point) - self._paths)
            raise ArchlabError(f"{self.path or self.name}: {unknown[0]}: not a parameter of this space")
        values = {"name": name or self.base.name, **point}
        try:
            return self.base.with_values(values)
        except ArchlabError:  # again, to name the point in the message (a search builds thousands of configs)
            return self.base.with_values(values, where=f"{self.path or self.name}: point {point}")

    def point_from(self, values: dict[str, Any]) -> dict[str, Any]:
        """A point read back from a table (CSV, a pandas column upcast to float by a missing cell,
        numpy scalars, a Parquet column stored as text) with each value snapped to the choice it
        stands for; a value that matches no choice is an error."""
        point = {}
        for p in self.params:
            v = values.get(p.path)
            v = v.item() if hasattr(v, "item") else v
            match = [c for c in p.choices if type(c) is type(v) and c == v] or \
                    [c for c in p.choices if not isinstance(c, (bool, str)) and not isinstance(v, (bool, str))
                     and v is not None and c == v] or [c for c in p.choices if str(c) == str(v)]
            if not match:
                raise ArchlabError(f"{self.path or self.name}: {p.path}: {v!r} is not one of {list(p.choices)}")
            point[p.path] = match[0]
        return point

    def sample_point(self, rng: random.Random) -> dict[str, Any]:
        return {p.path: rng.choice(p.choices) for p in self.params}

    def sample(self, n: int, seed: int = 0, *, prefix: str | None = None,
               avoid: frozenset[str] | set[str] = frozenset()) -> list[tuple[dict[str, Any], Config]]:
        """n random points (uniform over each parameter's choices) and their configs, seeded.

        The configs are distinct architectures (`digest`), none of them in `avoid`;
        draws that repeat one are skipped. Names are `<prefix>-s<seed>-<draw>` (prefix: the
        space's name)."""
        rng = random.Random(seed)
        out, seen = [], set(avoid)
        for k in range(100 * n + 100):
            if len(out) == n:
                return out
            point = self.sample_point(rng)
            cfg = self.config(point, name=f"{prefix or self.name}-s{seed}-{k}")
            if cfg.digest() not in seen:
                seen.add(cfg.digest())
                out.append((point, cfg))
        if len(out) < n:
            raise ArchlabError(f"{self.path or self.name}: found only {len(out)} distinct networks"
                               f"{' outside the ' + str(len(avoid)) + ' to avoid' if avoid else ''}, asked {n}")
        return out

    def at_resolution(self, resolution: int) -> "SearchSpace":
        """The same space with its base at another latent resolution."""
        base = self.base.with_values({"latent.resolution": resolution}, where=self.path or self.name)
        return dataclasses.replace(self, base=base)

    def to_dict(self) -> dict:
        """The space as its YAML mapping (`space_from_dict` reads it back)."""
        params = {p.path: dict(zip(("low", "high", "step"), p.int_range)) if p.int_range else list(p.choices)
                  for p in self.params}
        return {"name": self.name, "description": self.description, "base": self.base.to_dict(), "params": params}

    def block_signatures(self) -> list[BlockSpec]:
        """Every distinct block (by signature) that any point of the space can produce, sorted by key."""
        found: dict[tuple, BlockSpec] = {}
        for spec in self._stage_blocks():
            found.setdefault(spec.signature, spec)
        return sorted(found.values(), key=lambda s: s.key)

    def block_variants(self) -> dict[str, list[BlockSpec]]:
        """Every distinct block that some point of the space puts at each position (a block's `name`), in
        forward order of first appearance: what a weight-shared supernet of the space must hold."""
        found: dict[str, dict[tuple, BlockSpec]] = {}
        for spec in self._stage_blocks():
            found.setdefault(spec.name, {}).setdefault(spec.signature, spec)
        return {name: list(v.values()) for name, v in found.items()}

    def _stage_blocks(self):
        """The blocks of enough points to see every block of the space at every position.

        Exact without enumerating the whole product: a block of stage i depends only on stage i's
        parameters, network-wide parameters, the channels of stages i-1 and i+1, and the channels
        of stage 0 (they set the time-embedding width of every residual block), so it is enough to
        enumerate those combinations for each stage, holding the others at their first choice.
        Network-level blocks (time embedding, stem, head) are collected from every run.
        """
        first = {p.path: p.choices[0] for p in self.params}
        shared = [p for p in self.params if p.stage is None]
        for i in range(self.base.n_stages):
            local = [p for p in self.params if p.stage == i
                     or (p.stage in (0, i - 1, i + 1) and p.path.endswith(".channels"))]
            group = shared + local
            count = math.prod(len(p.choices) for p in group)
            if count > MAX_ENUMERATION:
                raise ArchlabError(f"{self.path or self.name}: stage {i} has {count:,} combinations of "
                                   f"{len(group)} parameters to enumerate (limit {MAX_ENUMERATION:,})")
            for values in itertools.product(*(p.choices for p in group)):
                cfg = self.config({**first, **dict(zip((p.path for p in group), values))})
                for spec in decompose(cfg):
                    if spec.stage in (i, -1):
                        yield spec


@dataclass(frozen=True)
class _SpaceSpec:
    """A search-space file as written."""
    base: dict  # the full config every sample starts from
    params: dict[str, Any] = setting(valid=bool, rule="a non-empty mapping of dotted path to choices")
    name: str | None = None
    description: str = ""


@dataclass(frozen=True)
class _Range:
    low: int
    high: int
    step: int = setting(1, valid=at_least(1), rule=">= 1")


def load_space(path: str | Path) -> SearchSpace:
    return space_from_dict(read_yaml(path), str(path))


def space_from_dict(data: Any, where: str) -> SearchSpace:
    """A search space from its YAML mapping (`where` names it in errors and is kept as its `path`)."""
    if not isinstance(data, dict):
        raise ArchlabError(f"{where}: a search space must be a mapping with `base` and `params`")
    spec = build(_SpaceSpec, data, where)
    base = arch_from_dict(spec.base, f"{where}: base")
    params = tuple(_param(path, choices, f"{where}: params.{path}") for path, choices in spec.params.items())
    space = SearchSpace(spec.name or Path(where).stem, base, params, spec.description.strip(), where)
    for p in params:  # every path exists and every single choice is valid on the base
        for choice in p.choices:
            base.with_values({p.path: choice}, where=f"{where}: params.{p.path} = {choice!r}")
    return space


def _param(path: str, spec: Any, at: str) -> Param:
    if not path:
        raise ArchlabError(f"{at}: a parameter path must be a dotted string")
    if isinstance(spec, list):
        if not spec:
            raise ArchlabError(f"{at}: needs at least one choice")
        if len({repr(c) for c in spec}) != len(spec):
            raise ArchlabError(f"{at}: repeated choice in {spec!r}")
        return Param(path, tuple(spec))
    if isinstance(spec, dict):
        r = build(_Range, spec, at)
        if r.high < r.low:
            raise ArchlabError(f"{at}: a range needs low <= high, got {spec!r}")
        return Param(path, tuple(range(r.low, r.high + 1, r.step)), (r.low, r.high, r.step))
    raise ArchlabError(f"{at}: must be a list of choices or {{low, high[, step]}}, got {spec!r}")
