"""The SnapGen block library: plain nn.Modules, each variation a constructor knob.

Modules are resolution-agnostic (spatial size comes from the input), so one network can be costed
at paper scale and trained at proxy scale. Attention uses F.scaled_dot_product_attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with gcd(groups, channels) groups, so any channel count is valid."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-5)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t (flip-sin-to-cos, as SDXL) -> Linear -> SiLU -> Linear."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))
        return self.linear_2(F.silu(self.linear_1(emb.to(self.linear_1.weight.dtype))))


def conv3x3(kind: str, cin: int, cout: int) -> nn.Module:
    """A 3x3 convolution: `standard`, or `separable` (depthwise 3x3 then pointwise 1x1)."""
    if kind == "standard":
        return nn.Conv2d(cin, cout, 3, padding=1)
    if kind == "separable":
        return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin), nn.Conv2d(cin, cout, 1))
    raise ValueError(f"unknown conv kind {kind!r}")


class ResBlock(nn.Module):
    """Residual block: norm-act-conv (to expansion*cout) + time embedding, norm-act-conv (to cout).

    conv="separable", expansion=r is SnapGen's block: DW 3x3 -> PW 1x1 to r*C -> +temb -> norm/act
    -> DW 3x3 -> PW 1x1 back to C. conv="standard", expansion=1 is SDXL's ResnetBlock2D.
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, conv: str = "standard", expansion: float = 1, groups: int = 32):
        super().__init__()
        hidden = round(expansion * cout)
        self.norm1 = group_norm(cin, groups)
        self.conv1 = conv3x3(conv, cin, hidden)
        self.time_proj = nn.Linear(temb_dim, hidden)
        self.norm2 = group_norm(hidden, groups)
        self.conv2 = conv3x3(conv, hidden, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


def rope_2d(x: torch.Tensor, hw: tuple[int, int], theta: float = 10000.0) -> torch.Tensor:
    """2D rotary embedding of x (B, heads, H*W, d): the first d/2 channels rotate with the row, the
    rest with the column, so q.k depends only on the (row, col) offset between two tokens."""
    h, w = hw
    d = x.shape[-1]
    quarter = d // 4
    freqs = theta ** (-torch.arange(quarter, device=x.device, dtype=torch.float32) / quarter)
    rows = torch.arange(h, device=x.device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=x.device, dtype=torch.float32).repeat(h)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # (N, d/2)
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # rotate consecutive pairs
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    """Self- or cross-attention with `heads` query heads sharing `kv_heads` K/V heads.

    kv_heads = heads is MHSA, 1 is MQA, anything between is GQA. Optional RMSNorm on per-head q/k
    and (self-attention only) 2D RoPE.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, context_dim: int | None = None,
                 qk_norm: bool = False, rope: bool = False):
        super().__init__()
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim {dim}, heads {heads}, kv_heads {kv_heads} do not divide")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        kv_in = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_in, kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(kv_in, kv_heads * self.head_dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.rope = rope

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, hw: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        src = x if context is None else context
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(src).view(b, src.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.to_v(src).view(b, src.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            if hw is None:
                raise ValueError("2D RoPE needs the token grid (hw)")
            q, k = rope_2d(q, hw), rope_2d(k, hw)
        if self.kv_heads != self.heads:  # each K/V head serves heads // kv_heads query heads
            group = self.heads // self.kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Linear -> GELU/GEGLU -> Linear with hidden width ratio * dim."""

    def __init__(self, dim: int, ratio: float, activation: str = "geglu"):
        super().__init__()
        hidden = round(ratio * dim)
        self.geglu = activation == "geglu"
        self.proj_in = nn.Linear(dim, hidden * (2 if self.geglu else 1))
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        if self.geglu:
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(h)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on tokens: [self-attention] + [cross-attention] + FFN.

    self_attention=False, cross_attention=True is SnapGen's CA+FFN conditioning block.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, context_dim: int, self_attention: bool = True,
                 cross_attention: bool = True, ffn_ratio: float = 4, ffn_activation: str = "geglu",
                 qk_norm: bool = False, rope: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if self_attention else None
        self.attn1 = Attention(dim, heads, kv_heads, None, qk_norm, rope) if self_attention else None
        self.norm2 = nn.LayerNorm(dim) if cross_attention else None
        self.attn2 = Attention(dim, heads, kv_heads, context_dim, qk_norm, False) if cross_attention else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ffn_ratio, ffn_activation)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, hw: tuple[int, int]) -> torch.Tensor:
        if self.attn1 is not None:
            x = x + self.attn1(self.norm1(x), hw=hw)
        if self.attn2 is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass the context tokens (B, L, context_dim)")
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class AttnIn(nn.Module):
    """Enter a transformer group: GroupNorm, flatten to tokens, linear projection (SDXL proj_in)."""

    def __init__(self, dim: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(dim, groups)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x).flatten(2).transpose(1, 2))


class AttnOut(nn.Module):
    """Leave a transformer group: linear projection, back to (B, C, H, W), add the group's input."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self.proj(tokens).transpose(1, 2).reshape(residual.shape)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvOut(nn.Module):
    """Output head: GroupNorm -> SiLU -> conv 3x3 to latent channels."""

    def __init__(self, cin: int, cout: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(cin, groups)
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


class Bound(nn.Module):
    """A block with its non-tensor arguments bound, so it can be traced or exported."""

    def __init__(self, block: nn.Module, kwargs: dict):
        super().__init__()
        self.block, self.kwargs = block, kwargs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.block(*tensors, **self.kwargs)


def conv_in(cin: int, cout: int) -> nn.Module:
    """The network's first layer: latent channels to the first stage's."""
    return nn.Conv2d(cin, cout, 3, padding=1)


def transformer(context_len: int, **hp) -> TransformerBlock:
    """A transformer block; `context_len` only shapes its inputs (the block works with any length)."""
    return TransformerBlock(**hp)
