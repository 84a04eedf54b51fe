"""Diffusion-transformer blocks for the SnapGen++ family (arXiv 2601.08303): patch embedding, the
timestep-modulated DiT block with full attention or ASSA, token down- and up-sampling between the
three stages, and the final layer back to the latent.

ASSA, adaptive sparse self-attention, mixes two branches per head with a sigmoid gate computed from
the input: a global branch in which every query attends to the K and V maps compressed by a 2x2
stride-2 depthwise conv each (4x fewer tokens; SnapGen++: kc = Conv(k), vc = Conv(v)), and a local branch of blockwise neighbourhood
attention: the grid is cut into `block` x `block` tiles and each query tile attends to the tiles
within Chebyshev distance `radius` of it (SnapGen++: tiles of 16 tokens, read here as 4 x 4, and
radius 1, the defaults). The local branch is dense attention over each tile's
gathered neighbourhood (padded at the borders and masked): shapes are static, so it exports to ONNX
and its multiply-adds are what fvcore counts for scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archlab.blocks import Attention, FeedForward, rope_2d


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def _tiles(t: torch.Tensor, hw: tuple[int, int], block: int) -> torch.Tensor:
    """(B, h, H*W, d) -> (B, h, H/block, W/block, block*block, d): the grid cut into tiles (batch and heads
    merged while permuting: 6 dims at most, XNNPACK's limit)."""
    b, h, _, d = t.shape
    nh, nw = hw[0] // block, hw[1] // block
    t = t.reshape(b * h, nh, block, nw, block, d).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, h, nh, nw, block * block, d)


def _untile(t: torch.Tensor, hw: tuple[int, int], block: int) -> torch.Tensor:
    """The inverse of `_tiles`."""
    b, h, nh, nw, _, d = t.shape
    t = t.reshape(b * h, nh, nw, block, block, d).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, h, hw[0] * hw[1], d)


def neighbourhoods(t: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, h, nh, nw, T, d) tiles -> (B, h, nh, nw, (2r+1)^2 * T, d): each tile's neighbour tiles within
    Chebyshev distance `radius` (row by row), zero-padded past the grid's border (mask those with
    `neighbourhoods` of ones). One gather by a fixed index over the padded grid: exported as one ONNX
    Gather, where a slice per neighbour made (2r+1)^2 Slices per tensor, and the ONNX exporter's
    optimiser pairs Slices in time quadratic in their number (a paper-scale DiT with ASSA: 7 minutes
    to export at 32x32 latent, against 1 without the optimiser)."""
    b, h, nh, nw, n, d = t.shape
    side, pw = 2 * radius + 1, nw + 2 * radius
    padded = F.pad(t, (0, 0, 0, 0, radius, radius, radius, radius)).flatten(2, 3)  # (B, h, (nh+2r)(nw+2r), T, d)
    rows = torch.arange(nh).view(nh, 1, 1, 1) + torch.arange(side).view(1, 1, side, 1)
    cols = torch.arange(nw).view(1, nw, 1, 1) + torch.arange(side).view(1, 1, 1, side)
    index = (rows * pw + cols).flatten().to(t.device)  # tile (a, b)'s neighbour (i, j): padded tile (a+i, b+j)
    return padded.index_select(2, index).reshape(b, h, nh, nw, side * side * n, d)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: tuple[int, int], block: int,
                    radius: int) -> torch.Tensor:
    """Blockwise neighbourhood attention: (B, h, H*W, d) q, k, v (k, v already expanded to q's heads)
    -> (B, h, H*W, d); each query attends to the keys in its tile and the tiles within `radius`."""
    if hw[0] % block or hw[1] % block:
        raise ValueError(f"ASSA: the token grid {hw[0]}x{hw[1]} is not divisible by the block size {block}")
    qt = _tiles(q, hw, block)
    kn = neighbourhoods(_tiles(k, hw, block), radius)
    vn = neighbourhoods(_tiles(v, hw, block), radius)
    ones = torch.ones_like(k[:1, :1, :, :1])  # (1, 1, H*W, 1): which gathered keys are on the grid
    valid = neighbourhoods(_tiles(ones, hw, block), radius)  # (1, 1, nh, nw, K, 1)
    b, h, nh, nw, t, d = qt.shape
    mask = (valid.transpose(-1, -2) > 0.5).expand(1, h, nh, nw, 1, kn.shape[4])  # over each tile's queries
    # 4-D attention (heads x tiles as one batch axis), as the ONNX exporter takes it
    out = F.scaled_dot_product_attention(qt.reshape(b, h * nh * nw, t, d), kn.reshape(b, h * nh * nw, -1, d),
                                         vn.reshape(b, h * nh * nw, -1, d),
                                         attn_mask=mask.reshape(1, h * nh * nw, 1, -1))
    return _untile(out.reshape(b, h, nh, nw, t, d), hw, block)


def _compressed(t: torch.Tensor, hw: tuple[int, int], conv: nn.Module) -> torch.Tensor:
    """(B, H*W, c) tokens -> the token grid through `conv` (e.g. 2x2 stride 2: 4x fewer tokens), as tokens."""
    b, _, c = t.shape
    return conv(t.transpose(1, 2).reshape(b, c, hw[0], hw[1])).flatten(2).transpose(1, 2)


class ASSA(nn.Module):
    """Adaptive sparse self-attention: a per-head sigmoid gate mixes a global branch (K/V from the grid
    compressed 2x2) and a local branch (blockwise neighbourhood attention). GQA/MQA via `kv_heads`;
    optional QK RMSNorm, and 2D RoPE on the local branch (whose keys keep their grid positions)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, block: int = 4, radius: int = 1, qk_norm: bool = False,
                 rope: bool = False):
        super().__init__()
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim {dim}, heads {heads}, kv_heads {kv_heads} do not divide")
        if block < 1 or radius < 0:
            raise ValueError(f"ASSA needs block >= 1 and radius >= 0, got {block}, {radius}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.block, self.radius, self.rope = block, radius, rope
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        kvd = kv_heads * self.head_dim
        # the global branch's K and V: 4x fewer tokens, by a depthwise conv (SnapGen++ leaves its groups open;
        # depthwise keeps GQA's wider K/V maps cheap, see search_spaces/snapgenpp_ablation.yaml)
        self.compress_k = nn.Conv2d(kvd, kvd, 2, stride=2, groups=kvd)
        self.compress_v = nn.Conv2d(kvd, kvd, 2, stride=2, groups=kvd)
        self.gate = nn.Linear(dim, heads)  # per head and token: the local branch's share
        self.to_out = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None

    def _k(self, k: torch.Tensor) -> torch.Tensor:
        k = _heads(k, self.kv_heads)
        return k if self.k_norm is None else self.k_norm(k)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.heads // self.kv_heads, dim=1) if self.kv_heads != self.heads else t

    def branches(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(local, global, gate), each per head: (B, h, N, d), (B, h, N, d), (B, h, N, 1)."""
        b, n, c = x.shape
        if hw[0] % 2 or hw[1] % 2:
            raise ValueError(f"ASSA: the token grid {hw[0]}x{hw[1]} must be even to compress it 2x2")
        q = _heads(self.to_q(x), self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k, v = self.to_k(x), self.to_v(x)
        kg, vg = _compressed(k, hw, self.compress_k), _compressed(v, hw, self.compress_v)
        k, v, kg, vg = self._k(k), _heads(v, self.kv_heads), self._k(kg), _heads(vg, self.kv_heads)
        glob = F.scaled_dot_product_attention(q, self._expand(kg), self._expand(vg))
        if self.rope:
            q, k = rope_2d(q, hw), rope_2d(k, hw)
        local = local_attention(q, self._expand(k), self._expand(v), hw, self.block, self.radius)
        gate = torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)
        return local, glob, gate

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                hw: tuple[int, int] | None = None) -> torch.Tensor:
        if hw is None:
            raise ValueError("ASSA needs the token grid (hw)")
        local, glob, gate = self.branches(x, hw)
        out = gate * local + (1 - gate) * glob
        b, n, _ = x.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """A DiT block on tokens: timestep-modulated (adaLN) self-attention, full or ASSA; cross-attention to
    the context tokens; a timestep-modulated FFN. The modulation's last layer starts at zero (adaLN-Zero),
    so a new block starts as the identity on its self-attention and FFN paths."""

    def __init__(self, dim: int, heads: int, kv_heads: int, temb_dim: int, context_dim: int,
                 ffn_ratio: float = 4, ffn_activation: str = "gelu", qk_norm: bool = False, rope: bool = False,
                 attention: str = "full", block: int = 4, radius: int = 1, cross_attention: bool = True):
        super().__init__()
        if attention not in ("full", "assa"):
            raise ValueError(f"attention must be full or assa, got {attention!r}")
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = (Attention(dim, heads, kv_heads, None, qk_norm, rope) if attention == "full"
                     else ASSA(dim, heads, kv_heads, block, radius, qk_norm, rope))
        self.norm2 = nn.LayerNorm(dim) if cross_attention else None
        self.cross = Attention(dim, heads, kv_heads, context_dim, qk_norm, False) if cross_attention else None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, ffn_ratio, ffn_activation)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None,
                hw: tuple[int, int]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(temb).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1), hw=hw)
        if self.cross is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass the context tokens (B, L, context_dim)")
            x = x + self.cross(self.norm2(x), context)
        return x + gate2 * self.ff(_modulate(self.norm3(x), shift2, scale2))


class PatchEmbed(nn.Module):
    """Latent (B, C, H, W) -> tokens (B, H/p * W/p, dim): a p x p stride-p conv."""

    def __init__(self, cin: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenResample(nn.Module):
    """Between stages: `down` shrinks the token grid `factor` times per side (a factor x factor stride-factor
    conv), `up` grows it (the transposed conv); either maps dim_in to dim_out channels (factor 1: only that)."""

    def __init__(self, dim_in: int, dim_out: int, direction: str, factor: int = 2):
        super().__init__()
        if direction not in ("down", "up"):
            raise ValueError(f"direction must be down or up, got {direction!r}")
        conv = nn.Conv2d if direction == "down" else nn.ConvTranspose2d
        self.proj = conv(dim_in, dim_out, factor, stride=factor)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return _compressed(x, hw, self.proj)


class FinalLayer(nn.Module):
    """Tokens -> latent: adaLN-modulated norm, a linear map to p x p x cout per token, unpatchify."""

    def __init__(self, dim: int, cout: int, patch: int, temb_dim: int):
        super().__init__()
        self.patch, self.cout = patch, cout
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * cout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        shift, scale = self.modulation(temb).unsqueeze(1).chunk(2, dim=-1)
        x = self.linear(_modulate(self.norm(x), shift, scale))
        b, p, (h, w) = x.shape[0], self.patch, hw
        x = x.reshape(b, h, w, p, p, self.cout).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, self.cout, h * p, w * p)


def dit_block(context_len: int, **hp) -> DiTBlock:
    """A DiT block; `context_len` only shapes its inputs (the block works with any length)."""
    return DiTBlock(**hp)


def fuse(cin: int, cout: int) -> nn.Linear:
    """Where a long skip joins: the concatenated tokens (cin channels) mapped back to cout (U-ViT)."""
    return nn.Linear(cin, cout)
