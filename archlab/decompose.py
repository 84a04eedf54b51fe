"""The spine: ArchConfig -> ordered list of BlockSpecs.

Builder, cost, latency tables, predictor and search all ask this module what blocks a network has;
nobody re-derives it. A BlockSpec is the kind of block, its hyper-parameters and its input
resolution; its `signature` (and the readable `key`) identifies it across networks, so a block
measured or costed once is known everywhere it appears.

Order follows the network's forward pass (SDXL layout)::

    time_embed, conv_in, [down stage: (res, [attn_in, transformer * d, attn_out]) * n, down] ...,
    mid: res, [attn_in, transformer * d, attn_out], res,
    [up stage: (res, [attn_in, transformer * d, attn_out]) * (n + 1), up] ..., conv_out

`skip="push"` marks blocks whose output joins the skip stack, `skip="pop"` residual blocks that
concatenate one skip onto their input first.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from archlab.config import ArchConfig, Config, DiTConfig
from archlab.kinds import KINDS, canonical


@dataclass(frozen=True)
class BlockSpec:
    kind: str
    hp: tuple[tuple[str, Any], ...]  # hyper-parameters, in a fixed order
    hw: tuple[int, int]  # input resolution (rows, cols); (0, 0) for the time embedding
    name: str = field(default="", compare=False)  # position in the network, e.g. "down.1.0.res"
    stage: int = field(default=-1, compare=False)  # stage index; -1 for network-level blocks
    skip: Literal["push", "pop", None] = field(default=None, compare=False)

    @property
    def signature(self) -> tuple:
        """Hashable identity of the block: equal signatures = same module shapes and inputs."""
        return (self.kind, self.hp, self.hw)

    @property
    def key(self) -> str:
        """Readable, unique string form of the signature (the row key of latency tables)."""
        args = ",".join(f"{k}={format_value(v)}" for k, v in self.hp)
        return f"{self.kind}({args})@{self.hw[0]}x{self.hw[1]}"

    @classmethod
    def from_key(cls, key: str) -> "BlockSpec":
        """The inverse of `key`: ``res(cin=256,...,conv=separable)@16x16`` -> BlockSpec."""
        m = _KEY.fullmatch(key.strip())
        if not m:
            raise ValueError(f"{key!r} is not a block key like kind(name=value,...)@HxW")
        kind, args, h, w = m.groups()
        hp = []
        for part in filter(None, args.split(",")):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"{key!r}: {part!r} is not name=value")
            hp.append((name.strip(), _parse(kind, name.strip(), value.strip())))
        return cls(kind, canonical(kind, hp), (int(h), int(w)))

    def params(self) -> dict[str, Any]:
        return dict(self.hp)

    def build(self):
        """The block as a torch module (torch is imported here: decomposing and keys do not need it)."""
        return KINDS[self.kind].build(**self.params())

    def runnable(self, batch: int = 1, device="cpu"):
        """The built block wrapped to take tensors only, and example inputs for it (seeded).

        This is what cost accounting traces and what the latency lab exports to ONNX.
        """
        import torch

        from archlab.blocks import Bound

        p, (h, w) = self.params(), self.hw
        g = torch.Generator().manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(batch, *shape, generator=g).to(device)

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(batch, *shape, generator=g).to(device)

        inputs, kwargs = KINDS[self.kind].inputs(p, (h, w), randn, rand)
        return Bound(self.build().to(device), kwargs), inputs


_KEY = re.compile(r"(\w+)\((.*)\)@(\d+)x(\d+)")


def _parse(kind: str, name: str, value: str) -> Any:
    if name in (KINDS[kind].bools if kind in KINDS else ()):
        if value not in ("0", "1"):
            raise ValueError(f"{name}={value!r}: must be 0 or 1")
        return value == "1"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def format_value(v: Any) -> str:
    """A hyper-parameter as block keys write it (bools 1/0, whole floats as integers)."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def decompose(cfg: Config) -> list[BlockSpec]:
    """The ordered blocks of the network that `cfg` describes."""
    return [b for seg in segments(cfg) for b in seg]


@dataclass(frozen=True)
class _Net:
    """The network-level values that shape blocks (a segment's cache key, with its stage)."""
    res: int  # latent resolution
    latent_channels: int
    width_mult: float
    head_dim: int  # width-scaled
    groups: int
    temb: int
    cond: Any  # ConditioningConfig
    qk_norm: bool
    rope: bool
    n_stages: int

    @staticmethod
    def of(cfg: ArchConfig) -> "_Net":
        return _Net(cfg.latent.resolution, cfg.latent.channels, cfg.width_mult, cfg.head_dim, cfg.norm_groups,
                    cfg.time_embed_dim, cfg.conditioning, cfg.attention.qk_norm, cfg.attention.rope, cfg.n_stages)

    def channels(self, s) -> int:
        return int(round(s.channels * self.width_mult))


def segments(cfg: Config) -> list[tuple[BlockSpec, ...]]:
    """The network's blocks in forward order, in segments (UNet: the head, each stage's down and up
    path, the mid block, the tail; DiT: the head, each stage, the tail). A segment is cached by
    everything that shapes it, so equal inputs give the very same tuple: a search that decomposes
    thousands of networks builds each stage's blocks once, and the latency predictor memoises a
    segment's latencies by it."""
    if isinstance(cfg, DiTConfig):
        return _dit_segments(cfg)
    net = _Net.of(cfg)
    c0 = net.channels(cfg.stages[0])
    out = [_head(net, c0)]
    ch, skips = c0, [c0]
    for i, s in enumerate(cfg.stages):
        seg, ch, pushed = _down(net, i, s, ch)
        out.append(seg)
        skips.extend(pushed)
    last = net.n_stages - 1
    seg, ch = _mid(net, last, cfg.stages[last], ch, cfg.effective_mid_depth)
    out.append(seg)
    for i in reversed(range(net.n_stages)):
        s = cfg.stages[i]
        n = s.res_blocks + 1
        popped = tuple(reversed(skips[-n:]))
        del skips[-n:]
        seg, ch = _up(net, i, s, ch, popped)
        out.append(seg)
    assert not skips, "skip stack must be empty: up path pops what the down path pushed"
    out.append(_tail(net, ch))
    return out


class _Segment:
    """Appends the blocks of one segment; `transformers`/`res` as the UNet's layers use them."""

    def __init__(self, net: _Net, i: int = -1, s=None):
        self.net, self.i, self.s, self.blocks = net, i, s, []

    def add(self, kind: str, hw: tuple[int, int], name: str, stage: int = -1, skip=None, **hp: Any) -> int:
        self.blocks.append(BlockSpec(kind, tuple(hp.items()), hw, name, stage, skip))
        return hp.get("cout", hp.get("dim", hp.get("channels", 0)))

    def transformers(self, hw, name: str, depth: int, self_attention: bool) -> None:
        net, i, s = self.net, self.i, self.s
        c = net.channels(s)
        heads = c // net.head_dim
        kv = {"mhsa": heads, "mqa": 1}.get(s.kv_heads, s.kv_heads)
        self.add("attn_in", hw, f"{name}.attn_in", i, dim=c, groups=net.groups)
        for d in range(depth):
            self.add("transformer", hw, f"{name}.transformer{d}", i, dim=c, heads=heads, kv_heads=kv,
                     self_attention=self_attention, cross_attention=i >= net.cond.first_stage,
                     context_dim=net.cond.context_dim, context_len=net.cond.context_len, ffn_ratio=s.ffn_ratio,
                     ffn_activation=s.ffn_activation, qk_norm=net.qk_norm, rope=net.rope and self_attention)
        self.add("attn_out", hw, f"{name}.attn_out", i, dim=c)

    def layer_transformers(self, hw, name: str) -> None:
        s = self.s
        if s.transformer_depth > 0:
            self.transformers(hw, name, s.transformer_depth, s.self_attention)
        elif self.i >= self.net.cond.first_stage:  # early conditioning: one CA+FFN block per layer
            self.transformers(hw, name, 1, False)

    def res(self, hw, name: str, cin: int, skip=None) -> int:
        s, net = self.s, self.net
        return self.add("res", hw, f"{name}.res", self.i, skip, cin=cin, cout=net.channels(s), temb_dim=net.temb,
                        conv=s.conv, expansion=s.expansion, groups=net.groups)


_cache = functools.lru_cache(maxsize=1 << 16)


def cache_clear() -> None:
    """Forget every cached segment (a benchmark's cold start; the caches are otherwise per process)."""
    for f in (_head, _down, _mid, _up, _tail, _dit_head, _dit_stage, _dit_tail):
        f.cache_clear()


@_cache
def _head(net: _Net, c0: int) -> tuple[BlockSpec, ...]:
    seg = _Segment(net)
    seg.add("time_embed", (0, 0), "time_embed", freq_dim=c0, dim=net.temb)
    seg.add("conv_in", (net.res, net.res), "conv_in", skip="push", cin=net.latent_channels, cout=c0)
    return tuple(seg.blocks)


@_cache
def _down(net: _Net, i: int, s, ch: int) -> tuple[tuple[BlockSpec, ...], int, tuple[int, ...]]:
    """Stage i's down path from `ch` input channels: (blocks, output channels, channels pushed as skips)."""
    seg, pushed = _Segment(net, i, s), []
    hw = (net.res >> i, net.res >> i)
    for j in range(s.res_blocks):
        name = f"down.{i}.{j}"
        replaced = (net.cond.inject == "replace" and s.transformer_depth == 0 and i >= net.cond.first_stage
                    and ch == net.channels(s))
        if not replaced:
            ch = seg.res(hw, name, ch)
        seg.layer_transformers(hw, name)
        seg.blocks[-1] = _with_skip(seg.blocks[-1], "push")
        pushed.append(ch)
    if i < net.n_stages - 1:
        ch = seg.add("down", hw, f"down.{i}.down", i, "push", channels=ch)
        pushed.append(ch)
    return tuple(seg.blocks), ch, tuple(pushed)


@_cache
def _mid(net: _Net, last: int, s, ch: int, depth: int) -> tuple[tuple[BlockSpec, ...], int]:
    seg = _Segment(net, last, s)
    hw = (net.res >> last, net.res >> last)
    ch = seg.res(hw, "mid.0", ch)
    if depth > 0:
        seg.transformers(hw, "mid", depth, s.self_attention)
    ch = seg.res(hw, "mid.1", ch)
    return tuple(seg.blocks), ch


@_cache
def _up(net: _Net, i: int, s, ch: int, skips: tuple[int, ...]) -> tuple[tuple[BlockSpec, ...], int]:
    """Stage i's up path: each residual block concatenates the next skip (`skips`, in pop order)."""
    seg = _Segment(net, i, s)
    hw = (net.res >> i, net.res >> i)
    for j, skip in enumerate(skips):
        name = f"up.{i}.{j}"
        ch = seg.res(hw, name, ch + skip, skip="pop")
        seg.layer_transformers(hw, name)
    if i > 0:
        ch = seg.add("up", hw, f"up.{i}.up", i, channels=ch)
    return tuple(seg.blocks), ch


@_cache
def _tail(net: _Net, ch: int) -> tuple[BlockSpec, ...]:
    seg = _Segment(net)
    seg.add("conv_out", (net.res, net.res), "conv_out", cin=ch, cout=net.latent_channels, groups=net.groups)
    return tuple(seg.blocks)


def _with_skip(spec: BlockSpec, skip: str) -> BlockSpec:
    return BlockSpec(spec.kind, spec.hp, spec.hw, spec.name, spec.stage, skip)  # type: ignore[arg-type]


# ---- the DiT family ------------------------------------------------------------------------------
#
#     time_embed, patch_embed, [down: dit * d0, (resample)], [middle: ([fuse] dit) * d1, (resample)],
#     [up: [fuse] dit * d2], final
#
# Token blocks' `hw` is their token grid. `skips` (archlab.config.DiTConfig) adds the `fuse` layers:
# `dense` one before each block of the Middle stage's second half, `u` one at the Up stage's start. A
# long skip's source is marked `skip="push"`, its fuse `skip="pop"`: the skips form a stack.


@dataclass(frozen=True)
class _DiTNet:
    """The network-level values that shape a DiT's blocks."""
    res: int  # latent resolution
    latent_channels: int
    patch: int
    head_dim: int  # width-scaled
    temb: int
    freq_dim: int
    context_dim: int
    context_len: int
    qk_norm: bool
    rope: bool
    skips: str
    stride: int  # the Middle stage's

    @staticmethod
    def of(cfg: DiTConfig) -> "_DiTNet":
        return _DiTNet(cfg.latent.resolution, cfg.latent.channels, cfg.patch, cfg.head_dim, cfg.temb, cfg.freq_dim,
                       cfg.conditioning.context_dim, cfg.conditioning.context_len, cfg.attention.qk_norm,
                       cfg.attention.rope, cfg.skips, cfg.middle_stride)


def _dit_segments(cfg: DiTConfig) -> list[tuple[BlockSpec, ...]]:
    net = _DiTNet.of(cfg)
    dims = tuple(cfg.channels(i) for i in range(3))
    out = [_dit_head(net, dims[0])]
    for i, s in enumerate(cfg.stages):
        d0 = dims[0] if i == 2 and cfg.skips == "u" else 0  # what the `u` skip brings to the Up stage
        out.append(_dit_stage(net, i, s, dims[i], dims[i + 1] if i < 2 else 0, d0))
    out.append(_dit_tail(net, dims[2]))
    return out


@_cache
def _dit_head(net: _DiTNet, d0: int) -> tuple[BlockSpec, ...]:
    return (BlockSpec("time_embed", (("freq_dim", net.freq_dim), ("dim", net.temb)), (0, 0), "time_embed"),
            BlockSpec("patch_embed", (("cin", net.latent_channels), ("dim", d0), ("patch", net.patch)),
                      (net.res, net.res), "patch_embed"))


@_cache
def _dit_stage(net: _DiTNet, i: int, s, dim: int, next_dim: int, d0: int) -> tuple[BlockSpec, ...]:
    """Stage i's blocks at width `dim`, then the resampling into the next stage (width `next_dim`); `d0`: the
    width the `u` skip brings into the Up stage."""
    stage = ("down", "middle", "up")[i]
    n = net.res // net.patch // (net.stride if i == 1 else 1)
    hw, heads, blocks = (n, n), dim // net.head_dim, []
    kv = {"mhsa": heads, "mqa": 1}.get(s.kv_heads, s.kv_heads)
    assa = s.attention == "assa"
    dit = (("dim", dim), ("heads", heads), ("kv_heads", kv), ("temb_dim", net.temb), ("context_dim", net.context_dim),
           ("context_len", net.context_len), ("ffn_ratio", s.ffn_ratio), ("ffn_activation", s.ffn_activation),
           ("qk_norm", net.qk_norm), ("rope", net.rope), ("attention", s.attention),
           ("block", s.block if assa else 0), ("radius", s.radius if assa else 0))  # full attention has no tiles
    if i == 2 and net.skips == "u":
        blocks.append(BlockSpec("fuse", (("cin", dim + d0), ("cout", dim)), hw, "up.fuse", i, "pop"))
    dense, half = i == 1 and net.skips == "dense", s.depth // 2
    for j in range(s.depth):
        if dense and j >= s.depth - half:  # joined by the output of block depth-1-j
            blocks.append(BlockSpec("fuse", (("cin", 2 * dim), ("cout", dim)), hw, f"middle.{j}.fuse", i, "pop"))
        push = (dense and j < half) or (i == 0 and net.skips == "u" and j == s.depth - 1)
        blocks.append(BlockSpec("dit", dit, hw, f"{stage}.{j}", i, "push" if push else None))
    if i < 2 and (net.stride > 1 or dim != next_dim):
        direction = "down" if i == 0 else "up"
        blocks.append(BlockSpec("resample", (("dim_in", dim), ("dim_out", next_dim), ("direction", direction),
                                             ("factor", net.stride)), hw, f"{stage}.resample", i))
    return tuple(blocks)


@_cache
def _dit_tail(net: _DiTNet, dim: int) -> tuple[BlockSpec, ...]:
    n = net.res // net.patch
    hp = (("dim", dim), ("cout", net.latent_channels), ("patch", net.patch), ("temb_dim", net.temb))
    return (BlockSpec("final", hp, (n, n), "final"),)
