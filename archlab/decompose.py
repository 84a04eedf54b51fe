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

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from archlab import blocks as B
from archlab.config import ArchConfig

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
        args = ",".join(f"{k}={_fmt(v)}" for k, v in self.hp)
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
            hp.append((name.strip(), _parse(name.strip(), value.strip())))
        return cls(kind, tuple(hp), (int(h), int(w)))

    def params(self) -> dict[str, Any]:
        return dict(self.hp)

    def build(self) -> nn.Module:
        return _BUILDERS[self.kind](**self.params())

    def runnable(self, batch: int = 1, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """The built block wrapped to take tensors only, and example inputs for it (seeded).

        This is what cost accounting traces and what the latency lab exports to ONNX.
        """
        p, (h, w) = self.params(), self.hw
        g = torch.Generator().manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(batch, *shape, generator=g).to(device)

        kwargs: dict[str, Any] = {}
        kind = self.kind
        if kind == "time_embed":
            inputs: tuple = (torch.rand(batch, generator=g).to(device) * 1000,)
        elif kind == "res":
            inputs = (randn(p["cin"], h, w), randn(p["temb_dim"]))
        elif kind == "transformer":
            kwargs["hw"] = (h, w)
            if p["cross_attention"]:
                inputs = (randn(h * w, p["dim"]), randn(p["context_len"], p["context_dim"]))
            else:
                inputs, kwargs["context"] = (randn(h * w, p["dim"]),), None
        elif kind == "attn_out":
            inputs = (randn(h * w, p["dim"]), randn(p["dim"], h, w))
        else:
            inputs = (randn(p.get("cin", p.get("dim", p.get("channels"))), h, w),)
        return _Bound(self.build().to(device), kwargs), inputs


class _Bound(nn.Module):
    """A block with its non-tensor arguments bound, so it can be traced or exported."""

    def __init__(self, block: nn.Module, kwargs: dict[str, Any]):
        super().__init__()
        self.block, self.kwargs = block, kwargs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.block(*tensors, **self.kwargs)


_KEY = re.compile(r"(\w+)\((.*)\)@(\d+)x(\d+)")
_BOOL_HP = frozenset({"self_attention", "cross_attention", "qk_norm", "rope"})


def _parse(name: str, value: str) -> Any:
    if name in _BOOL_HP:
        if value not in ("0", "1"):
            raise ValueError(f"{name}={value!r}: must be 0 or 1")
        return value == "1"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "time_embed": B.TimestepEmbedding,
    "conv_in": lambda cin, cout: nn.Conv2d(cin, cout, 3, padding=1),
    "res": B.ResBlock,
    "attn_in": B.AttnIn,
    "transformer": lambda context_len, **hp: B.TransformerBlock(**hp),  # context_len only shapes inputs
    "attn_out": B.AttnOut,
    "down": B.Downsample,
    "up": B.Upsample,
    "conv_out": B.ConvOut,
}


def decompose(cfg: ArchConfig) -> list[BlockSpec]:
    """The ordered blocks of the network that `cfg` describes."""
    out: list[BlockSpec] = []
    groups = cfg.norm_groups
    temb = cfg.time_embed_dim
    cond = cfg.conditioning

    def add(kind: str, hw: tuple[int, int], name: str, stage: int = -1, skip=None, **hp: Any) -> int:
        out.append(BlockSpec(kind, tuple(hp.items()), hw, name, stage, skip))
        return hp.get("cout", hp.get("dim", hp.get("channels", 0)))

    def transformers(i: int, hw, name: str, depth: int, self_attention: bool) -> None:
        s, c = cfg.stages[i], cfg.channels(i)
        add("attn_in", hw, f"{name}.attn_in", i, dim=c, groups=groups)
        for d in range(depth):
            add("transformer", hw, f"{name}.transformer{d}", i, dim=c, heads=cfg.heads(i), kv_heads=cfg.kv_heads(i),
                self_attention=self_attention, cross_attention=i >= cond.first_stage,
                context_dim=cond.context_dim, context_len=cond.context_len, ffn_ratio=s.ffn_ratio,
                ffn_activation=s.ffn_activation, qk_norm=cfg.attention.qk_norm,
                rope=cfg.attention.rope and self_attention)
        add("attn_out", hw, f"{name}.attn_out", i, dim=c)

    def layer_transformers(i: int, hw, name: str) -> None:
        depth, self_attention = cfg.layer_transformers(i)
        if depth:
            transformers(i, hw, name, depth, self_attention)

    def res(i: int, hw, name: str, cin: int, skip=None) -> int:
        s = cfg.stages[i]
        return add("res", hw, f"{name}.res", i, skip, cin=cin, cout=cfg.channels(i), temb_dim=temb,
                   conv=s.conv, expansion=s.expansion, groups=groups)

    res_hw = cfg.latent.resolution
    add("time_embed", (0, 0), "time_embed", freq_dim=cfg.channels(0), dim=temb)
    ch = add("conv_in", (res_hw, res_hw), "conv_in", skip="push", cin=cfg.latent.channels, cout=cfg.channels(0))
    skips = [ch]

    for i, s in enumerate(cfg.stages):  # down path
        hw = (res_hw >> i, res_hw >> i)
        for j in range(s.res_blocks):
            name = f"down.{i}.{j}"
            replaced = (cond.inject == "replace" and s.transformer_depth == 0 and i >= cond.first_stage
                        and ch == cfg.channels(i))
            if not replaced:
                ch = res(i, hw, name, ch)
            layer_transformers(i, hw, name)
            out[-1] = _with_skip(out[-1], "push")
            skips.append(ch)
        if i < cfg.n_stages - 1:
            ch = add("down", hw, f"down.{i}.down", i, "push", channels=ch)
            skips.append(ch)

    last = cfg.n_stages - 1
    hw = (res_hw >> last, res_hw >> last)
    ch = res(last, hw, "mid.0", ch)
    if cfg.effective_mid_depth > 0:
        transformers(last, hw, "mid", cfg.effective_mid_depth, cfg.stages[last].self_attention)
    ch = res(last, hw, "mid.1", ch)

    for i in reversed(range(cfg.n_stages)):  # up path
        s = cfg.stages[i]
        hw = (res_hw >> i, res_hw >> i)
        for j in range(s.res_blocks + 1):
            name = f"up.{i}.{j}"
            ch = res(i, hw, name, ch + skips.pop(), skip="pop")
            layer_transformers(i, hw, name)
        if i > 0:
            ch = add("up", hw, f"up.{i}.up", i, channels=ch)
    assert not skips, "skip stack must be empty: up path pops what the down path pushed"
    add("conv_out", (res_hw, res_hw), "conv_out", cin=ch, cout=cfg.latent.channels, groups=groups)
    return out


def _with_skip(spec: BlockSpec, skip: str) -> BlockSpec:
    return BlockSpec(spec.kind, spec.hp, spec.hw, spec.name, spec.stage, skip)  # type: ignore[arg-type]
