"""Configs: validated, typed descriptions of a network, loaded from YAML. Two families: `ArchConfig`,
a SnapGen-family UNet (the default), and `DiTConfig`, a SnapGen++-style three-stage DiT (`family: dit`,
see its docstring); `arch_from_dict` / `load_arch` read either.

A config is plain data. `archlab.decompose` turns it into the list of blocks that everything else
(builder, cost, latency, search) uses. Stage indices are 0-based: stage 0 is the highest resolution.

The UNet's YAML shape (every key optional except `stages`; see search_spaces/snapgen_ablation.yaml)::

    name: my-unet
    latent: {channels: 4, resolution: 32}
    width_mult: 1.0            # proxy-scale copies: channels and head_dim are multiplied by it
    time_embed_mult: 4         # time-embedding width = time_embed_mult * channels of stage 0
    norm_groups: 32            # GroupNorm uses gcd(norm_groups, channels) groups
    attention: {head_dim: 64, qk_norm: false, rope: false}
    conditioning: {context_dim: 2048, context_len: 77, first_stage: 1, inject: add}
    mid_depth: 4               # transformer blocks in the mid block (default: last stage's depth)
    stage_defaults: {res_blocks: 2, conv: standard, expansion: 1, ffn_ratio: 4, ...}
    stages:
      - {channels: 256, transformer_depth: 0}
      - {channels: 512, transformer_depth: 2, self_attention: false}
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from archlab.errors import ArchlabError
from archlab.schema import at_least, build, check, coerce, located, positive, require_mapping, schema_fields, setting

Number = Union[int, float]
KVHeads = Union[int, Literal["mhsa", "mqa"]]


@dataclass(frozen=True)
class LatentConfig:
    channels: int = setting(4, valid=at_least(1), rule=">= 1")
    resolution: int = setting(32, valid=at_least(1), rule=">= 1")


@dataclass(frozen=True)
class AttentionConfig:
    head_dim: int = setting(64, valid=at_least(1), rule=">= 1")
    qk_norm: bool = False  # RMSNorm on per-head q and k
    rope: bool = False  # 2D rotary embedding (row, col) in self-attention


@dataclass(frozen=True)
class ConditioningConfig:
    context_dim: int = setting(2048, valid=at_least(1), rule=">= 1")  # width of the text/class context tokens
    context_len: int = setting(77, valid=at_least(1), rule=">= 1")  # number of context tokens
    first_stage: int = 1  # 0-based: transformers of stages >= first_stage get cross-attention
    # A conditioned stage with no transformer blocks of its own gets one CA+FFN block (no
    # self-attention) per layer: `add` puts it after the residual block, `replace` puts it instead
    # of the down-path residual block wherever channels do not change (SnapGen's "the first-stage
    # residual block is turned into a transformer block with cross-attention + FFN").
    inject: Literal["add", "replace"] = "add"


@dataclass(frozen=True)
class StageConfig:
    channels: int = setting(valid=at_least(1), rule=">= 1")
    transformer_depth: int = setting(0, valid=at_least(0), rule=">= 0")  # transformer blocks after each residual block
    res_blocks: int = setting(2, valid=at_least(1), rule=">= 1")  # per down layer; the up path has res_blocks + 1 (SDXL layout)
    self_attention: bool = True
    conv: Literal["standard", "separable"] = "standard"  # separable = DW 3x3 + PW 1x1
    expansion: Number = 1  # hidden channels of the residual block = expansion * channels
    ffn_ratio: Number = 4
    ffn_activation: Literal["gelu", "geglu"] = "geglu"
    kv_heads: KVHeads = "mhsa"  # mhsa = one K/V head per query head, mqa = 1, an int = GQA


class _Config:
    """What every family's config shares: loading (with `stage_defaults`), dicts, the digest, dotted-path
    copies and the width-scaled values. A family's class sets FAMILY and STAGE (its stage class)."""

    FAMILY: ClassVar[str]
    STAGE: ClassVar[type]

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str = ""):
        """Build and validate; raises ArchlabError naming the field (prefixed by `where`)."""
        data = dict(require_mapping(data, where or "config"))
        family = data.pop("family", cls.FAMILY)
        if family != cls.FAMILY:
            raise ArchlabError(f"{located(where, 'family')}: {family!r} is not {cls.FAMILY!r} (a {cls.__name__})")
        keys = tuple(f.name for f in fields(cls.STAGE))
        defaults = data.pop("stage_defaults", None)
        defaults = {} if defaults is None else require_mapping(defaults, located(where, "stage_defaults"))
        for key in defaults:
            if key not in keys or key == "channels":
                raise ArchlabError(f"{located(where, 'stage_defaults')}: unknown key {key!r} (allowed: {', '.join(k for k in keys if k != 'channels')})")
        if isinstance(data.get("stages"), list):  # anything else: build names the problem
            data["stages"] = [{**defaults, **require_mapping(s, located(where, f"stages[{i}]"))}
                              for i, s in enumerate(data["stages"])]
        cfg = build(cls, data, where)
        cfg.validate(where)
        return cfg

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_yaml(path), where=str(path))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["stages"] = list(out["stages"])
        # the UNet, the first family, writes no `family` key: its digests predate families
        return out if self.FAMILY == "unet" else {"family": self.FAMILY, **out}

    def digest(self) -> str:
        """A hash of everything that shapes the network (the config without its name)."""
        data = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_values(self, values: dict[str, Any], where: str = ""):
        """A copy with dotted-path values set (``stages.1.conv``, ``attention.rope``), validated."""
        try:  # the fast path (a search builds thousands of configs): replace the fields, check, validate
            cfg = _apply(self, values)
            cfg.validate(where)
            return cfg
        except (_Slow, ArchlabError, AttributeError, TypeError):
            pass  # the general path below gives the error message (or sets a whole section)
        data = self.to_dict()
        for path, value in values.items():
            set_path(data, path, value, where)
        return type(self).from_dict(data, where)

    # ---- derived, effective (width-scaled) values ---------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def channels(self, i: int) -> int:
        return _scaled(self.stages[i].channels, self.width_mult)

    @property
    def head_dim(self) -> int:
        return _scaled(self.attention.head_dim, self.width_mult)

    def heads(self, i: int) -> int:
        return self.channels(i) // self.head_dim

    def kv_heads(self, i: int) -> int:
        kv = self.stages[i].kv_heads
        return {"mhsa": self.heads(i), "mqa": 1}.get(kv, kv)  # type: ignore[arg-type]

    def _check_stage(self, i: int, fail, keys: tuple[str, ...], attention: bool = True) -> None:
        """Stage i's ratios (`keys`) give whole channels; with `attention`, its width splits into heads
        and K/V heads."""
        s, c, p = self.stages[i], self.channels(i), f"stages[{i}]"
        if isinstance(s.kv_heads, int) and s.kv_heads < 1:
            fail(f"{p}.kv_heads", f"must be mhsa, mqa or an integer >= 1, got {s.kv_heads}")
        for key in keys:
            r = getattr(s, key)
            if r <= 0:
                fail(f"{p}.{key}", f"must be > 0, got {r}")
            if not _is_int(r * c):
                fail(f"{p}.{key}", f"{r} * {c} channels is not an integer")
        if not attention:
            return
        if c % self.head_dim:
            fail(f"{p}.channels", f"{c} is not divisible by attention.head_dim {self.head_dim}")
        if self.heads(i) % self.kv_heads(i):
            fail(f"{p}.kv_heads", f"{s.kv_heads} does not divide the {self.heads(i)} heads of stage {i} ({c} channels / head_dim {self.head_dim})")

    def _check_widths(self, fail) -> None:
        w = self.width_mult
        if not _is_int(self.attention.head_dim * w) or self.head_dim < 1:
            fail("width_mult", f"{w} makes attention.head_dim {self.attention.head_dim} * {w} = {self.attention.head_dim * w}, not a positive integer")
        if self.attention.rope and self.head_dim % 4:
            fail("attention.rope", f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        for i, s in enumerate(self.stages):
            if not _is_int(s.channels * w) or self.channels(i) < 1:
                fail("width_mult", f"{w} makes stages[{i}].channels {s.channels} * {w} = {s.channels * w}, not a positive integer")


@dataclass(frozen=True)
class ArchConfig(_Config):
    """A SnapGen-family UNet (`family: unet`, the default)."""

    FAMILY: ClassVar[str] = "unet"
    STAGE: ClassVar[type] = StageConfig

    stages: tuple[StageConfig, ...]
    name: str = "unet"
    latent: LatentConfig = field(default_factory=LatentConfig)
    width_mult: Number = setting(1.0, valid=positive, rule="> 0")
    time_embed_mult: int = setting(4, valid=at_least(1), rule=">= 1")
    norm_groups: int = setting(32, valid=at_least(1), rule=">= 1")
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    mid_depth: int | None = setting(None, valid=at_least(0), rule=">= 0")  # None: the last stage's transformer_depth

    @property
    def time_embed_dim(self) -> int:
        return self.time_embed_mult * self.channels(0)

    @property
    def effective_mid_depth(self) -> int:
        return self.stages[-1].transformer_depth if self.mid_depth is None else self.mid_depth

    def layer_transformers(self, i: int) -> tuple[int, bool]:
        """(depth, self_attention) of the transformer blocks after each residual block of stage i.

        A stage's own blocks, or, for a conditioned stage without any, one CA+FFN block without
        self-attention (early conditioning); (0, False) for none.
        """
        s = self.stages[i]
        if s.transformer_depth > 0:
            return s.transformer_depth, s.self_attention
        return (1, False) if i >= self.conditioning.first_stage else (0, False)

    def uses_attention(self, i: int) -> bool:
        """True if stage i has any transformer block (its layers', or the mid block's)."""
        return self.layer_transformers(i)[0] > 0 or (i == self.n_stages - 1 and self.effective_mid_depth > 0)

    # ---- validation ------------------------------------------------------------------------
    def validate(self, where: str = "") -> None:
        def fail(path: str, msg: str) -> None:
            raise ArchlabError(f"{located(where, path)}: {msg}")

        if not self.stages:
            fail("stages", "must be a non-empty list of stages")
        check(self, where)  # each field's own range
        for i, s in enumerate(self.stages):
            check(s, where, prefix=f"stages[{i}]")
        if not 0 <= self.conditioning.first_stage < self.n_stages:
            fail("conditioning.first_stage", f"must be a stage index in 0..{self.n_stages - 1}, got {self.conditioning.first_stage}")
        down = 2 ** (self.n_stages - 1)
        if self.latent.resolution % down:
            fail("latent.resolution", f"{self.latent.resolution} is not divisible by {down} ({self.n_stages} stages halve it {self.n_stages - 1} times)")
        self._check_widths(fail)
        for i in range(self.n_stages):
            attention = self.uses_attention(i)
            self._check_stage(i, fail, ("expansion", "ffn_ratio") if attention else ("expansion",), attention)


# ---- the DiT family (SnapGen++) --------------------------------------------------------------------

DIT_STAGES = ("down", "middle", "up")


@dataclass(frozen=True)
class ContextConfig:
    context_dim: int = setting(2048, valid=at_least(1), rule=">= 1")  # width of the text/class context tokens
    context_len: int = setting(77, valid=at_least(1), rule=">= 1")  # number of context tokens (every block attends to them)


@dataclass(frozen=True)
class DiTStageConfig:
    channels: int = setting(valid=at_least(1), rule=">= 1")  # the width of the stage's tokens
    depth: int = setting(2, valid=at_least(0), rule=">= 0")  # DiT blocks
    attention: Literal["full", "assa"] = "full"  # self-attention: full, or ASSA (adaptive sparse)
    block: int = setting(4, valid=at_least(1), rule=">= 1")  # ASSA: the local branch's tiles are block x block tokens
    radius: int = setting(1, valid=at_least(0), rule=">= 0")  # ASSA: each tile attends to the tiles within this distance
    kv_heads: KVHeads = "mhsa"
    ffn_ratio: Number = 4
    ffn_activation: Literal["gelu", "geglu"] = "gelu"


@dataclass(frozen=True)
class DiTConfig(_Config):
    """A SnapGen++-style three-stage diffusion transformer (`family: dit`).

    Down and Up work on the full token grid (latent / patch), Middle on a grid `middle_stride` times
    coarser (a 2x2 stride-2 conv between Down and Middle, a transposed one between Middle and Up; with
    stride 1 only a width change, if any, is projected). `skips`: `none`; `u`: the Down stage's output
    joins the Up stage's input; `dense`: U-ViT long skips inside the Middle stage (the output of its
    block j joins the input of block n-1-j), SnapGen++'s "dense skip connections in the middle stage".
    A skip joins by concatenation and a linear layer (U-ViT). YAML shape::

        family: dit
        latent: {channels: 4, resolution: 32}
        patch: 2
        stages:                # exactly three: down, middle, up
          - {channels: 1152, depth: 4, attention: assa}
          - {channels: 1152, depth: 12}
          - {channels: 1152, depth: 8, attention: assa}
    """

    FAMILY: ClassVar[str] = "dit"
    STAGE: ClassVar[type] = DiTStageConfig

    stages: tuple[DiTStageConfig, ...]
    name: str = "dit"
    latent: LatentConfig = field(default_factory=LatentConfig)
    patch: int = setting(2, valid=at_least(1), rule=">= 1")  # p x p latent pixels per token
    middle_stride: Literal[1, 2] = 2  # the Middle stage's token grid is this many times coarser per side
    skips: Literal["none", "u", "dense"] = "none"
    width_mult: Number = setting(1.0, valid=positive, rule="> 0")
    time_embed_dim: int = setting(256, valid=at_least(1), rule=">= 1")  # width of the timestep embedding (x width_mult)
    freq_dim: int = setting(256, valid=at_least(1), rule=">= 1")  # sinusoidal features of the timestep
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    conditioning: ContextConfig = field(default_factory=ContextConfig)

    @property
    def tokens(self) -> int:
        """The side of the Down and Up stages' token grid."""
        return self.latent.resolution // self.patch

    def grid(self, i: int) -> int:
        """The side of stage i's token grid."""
        return self.tokens // self.middle_stride if i == 1 else self.tokens

    @property
    def temb(self) -> int:
        return _scaled(self.time_embed_dim, self.width_mult)

    def validate(self, where: str = "") -> None:
        def fail(path: str, msg: str) -> None:
            raise ArchlabError(f"{located(where, path)}: {msg}")

        if len(self.stages) != 3:
            fail("stages", f"a DiT has three stages ({', '.join(DIT_STAGES)}), got {len(self.stages)}")
        check(self, where)
        for i, s in enumerate(self.stages):
            check(s, where, prefix=f"stages[{i}]")
        res, p = self.latent.resolution, self.patch
        if res % p:
            fail("patch", f"{p} does not divide latent.resolution {res}")
        if self.tokens % self.middle_stride:
            fail("middle_stride", f"{self.middle_stride} does not divide the {self.tokens}x{self.tokens} token grid")
        if not _is_int(self.time_embed_dim * self.width_mult) or self.temb < 1:
            fail("width_mult", f"{self.width_mult} makes time_embed_dim {self.time_embed_dim} * {self.width_mult} not a positive integer")
        self._check_widths(fail)
        for i, s in enumerate(self.stages):
            self._check_stage(i, fail, ("ffn_ratio",))
            n = self.grid(i)
            if s.attention == "assa" and s.depth and (n % 2 or n % s.block):
                fail(f"stages[{i}].block", f"ASSA needs the {DIT_STAGES[i]} stage's {n}x{n} token grid even (its "
                                           f"global branch compresses 2x2) and divisible by block {s.block}")
        if self.skips == "u" and not self.stages[0].depth:
            fail("skips", "u joins the Down stage's output to the Up stage: the Down stage needs depth >= 1")


FAMILIES: dict[str, type] = {c.FAMILY: c for c in (ArchConfig, DiTConfig)}
Config = Union[ArchConfig, DiTConfig]


def arch_from_dict(data: Any, where: str = "") -> Config:
    """A config of the family its `family` key names (default: unet), built and validated."""
    family = data.get("family", "unet") if isinstance(data, dict) else "unet"
    if family not in FAMILIES:
        raise ArchlabError(f"{located(where, 'family')}: {family!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[family].from_dict(data, where)


def load_arch(path: str | Path) -> Config:
    return arch_from_dict(read_yaml(path), where=str(path))


# ---- YAML and dotted paths ---------------------------------------------------------------------

def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise ArchlabError(f"{path}: no such file")
    if not path.is_file():
        raise ArchlabError(f"{path}: not a file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ArchlabError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise ArchlabError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ArchlabError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def set_path(data: dict, path: str, value: Any, where: str = "") -> None:
    """Set ``a.b.0.c`` in nested dicts/lists; ``*`` sets every element of a list
    (``stages.*.conv``). Every step must already exist, so a typo is an error, not a new key."""
    if not isinstance(path, str) or not path:
        raise ArchlabError(f"{located(where, repr(path))}: a path must be a dotted string like stages.1.conv")
    _set(data, path.split("."), 0, value, where, path)


def _set(node: Any, parts: list[str], depth: int, value: Any, where: str, path: str) -> None:
    part, here, last = parts[depth], ".".join(parts[: depth + 1]), depth == len(parts) - 1
    if isinstance(node, list):
        if part == "*":
            keys: list[Any] = list(range(len(node)))
        elif part.isdigit() and int(part) < len(node):
            keys = [int(part)]
        else:
            raise ArchlabError(f"{located(where, path)}: no list element {part!r} at {here!r} (the list has {len(node)} items)")
    elif isinstance(node, dict):
        if part not in node:
            raise ArchlabError(f"{located(where, path)}: unknown key {part!r} at {here!r}")
        keys = [part]
    else:
        raise ArchlabError(f"{located(where, path)}: {'.'.join(parts[:depth])!r} is not a mapping or list")
    for key in keys:
        if last:
            node[key] = value
        else:
            _set(node[key], parts, depth + 1, value, where, path)


class _Slow(Exception):
    """A path the fast `with_values` does not take (a whole section, a bad index or key)."""


def _apply(node: Any, values: dict[str, Any]) -> Any:
    """`node` with the scalar fields at dotted paths set (``*`` = every stage), each value's type
    checked: one `replace` per changed node, by a plan made once per set of paths."""
    n = len(node.stages) if isinstance(node, _Config) else 0
    return _run(node, _plan(type(node), tuple(values), n), tuple(values.values()))


def _run(node: Any, plan: tuple, values: tuple) -> Any:
    leaves, sections, items = plan
    if items:
        out = list(node)
        for i, sub in items:
            out[i] = _run(out[i], sub, values)
        return tuple(out)
    cls = type(node)
    changes = {}
    for name, j in leaves:
        v = values[j]
        try:
            changes[name] = _coerced(cls, name, v, type(v))  # type(v): True and 1 are equal keys, not values
        except TypeError:  # unhashable: a list or mapping where a scalar belongs
            raise _Slow from None
    for name, sub in sections:
        changes[name] = _run(getattr(node, name), sub, values)
    return replace(node, **changes) if changes else node


@functools.lru_cache(maxsize=256)
def _plan(cls: type, paths: tuple[str, ...], n_stages: int) -> tuple:
    """(leaves: (field, value index), sections: (field, plan), items: (stage index, plan)) for `cls`."""
    return _plan_for(cls, [(p.split("."), j) for j, p in enumerate(paths)], n_stages)


def _plan_for(cls: type, updates: list, n_stages: int, items: bool = False) -> tuple:
    if items:  # the stages tuple: `cls` is its element's class
        per_item: dict[int, list] = {}
        for parts, j in updates:
            part = parts[0]
            index = range(n_stages) if part == "*" else [int(part)] if part.isdigit() and int(part) < n_stages else None
            if index is None or len(parts) == 1:
                raise _Slow  # a bad index, or a whole stage
            for i in index:
                per_item.setdefault(i, []).append((parts[1:], j))
        return (), (), tuple((i, _plan_for(cls, ups, n_stages)) for i, ups in sorted(per_item.items()))
    hints, _ = schema_fields(cls)
    leaves_ok, sections_ok = _fields(cls)
    leaves, nested = [], {}
    for parts, j in updates:
        part = parts[0]
        if len(parts) == 1 and part in leaves_ok:
            leaves.append((part, j))
        elif len(parts) > 1 and part in sections_ok:
            nested.setdefault(part, []).append((parts[1:], j))
        else:
            raise _Slow
    sections = tuple((name, _plan_for(get_args(hints[name])[0], ups, n_stages, True) if get_origin(hints[name]) is tuple
                      else _plan_for(hints[name], ups, n_stages)) for name, ups in nested.items())
    return tuple(leaves), sections, ()


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[frozenset, frozenset]:
    """(scalar fields, sections: fields holding a dataclass or a tuple of them) of a config class."""
    hints, known = schema_fields(cls)
    sections = frozenset(n for n in known if dataclasses.is_dataclass(hints[n]) or get_origin(hints[n]) is tuple)
    return frozenset(known) - sections, sections


@functools.lru_cache(maxsize=4096)
def _coerced(cls: type, name: str, value: Any, kind: type) -> Any:
    return coerce(schema_fields(cls)[0][name], value, "", name)


def _is_int(x: float) -> bool:
    return abs(x - round(x)) < 1e-9


def _scaled(value: int, mult: float) -> int:
    return int(round(value * mult))


def with_width(cfg: Config, width_mult: float) -> Config:
    """The same design at another width (proxy scale); validated."""
    out = replace(cfg, width_mult=width_mult)
    out.validate(f"{cfg.name} at width {width_mult}")
    return out
