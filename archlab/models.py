"""The networks a config describes: the UNet and the DiT, each assembled from exactly the blocks
`decompose(cfg)` lists and run in that order by its family's forward pass.

A family's forward pass is a function of (specs, blocks): `run_unet` / `run_dit` take the block list
and one callable per block, so a weight-shared supernet (archlab.elastic) runs a sub-network through
the very code that runs a standalone one.

    UNet: time_embed, conv_in, [down: (res, [attn_in, transformer * d, attn_out]) * n, down] ..., mid,
          [up: ...] ..., conv_out; `skip="push"` blocks feed the skip stack, `pop` res blocks take one.
    DiT:  time_embed, patch_embed, Down blocks, resample, Middle blocks, resample, Up blocks, final;
          token blocks run on their stage's token grid (`spec.hw`); a long skip's `fuse` (pop)
          concatenates the output of the block marked `push` and maps it back.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from archlab.config import Config, DiTConfig
from archlab.decompose import BlockSpec, decompose
from archlab.kinds import KINDS

Block = Callable[..., torch.Tensor]


def run_unet(specs: Sequence[BlockSpec], blocks: Sequence[Block], x: torch.Tensor, t: torch.Tensor,
             context: torch.Tensor | None) -> torch.Tensor:
    """The UNet's forward pass over `blocks` (one per spec, in order)."""
    skips: list[torch.Tensor] = []
    h = x
    for spec, block in zip(specs, blocks):
        role = KINDS[spec.kind].role
        if role == "time":
            emb = block(t)
            continue
        if role == "res":
            if spec.skip == "pop":
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        elif role == "tokens_in":
            residual, hw = h, (h.shape[-2], h.shape[-1])
            tokens = block(h)
        elif role == "tokens":
            tokens = block(tokens, context, hw)
        elif role == "tokens_out":
            h = block(tokens, residual)
        else:  # map: one tensor in, one out (conv_in, down, up, conv_out)
            h = block(h)
        if spec.skip == "push":
            skips.append(h)
    return h


def run_dit(specs: Sequence[BlockSpec], blocks: Sequence[Block], x: torch.Tensor, t: torch.Tensor,
            context: torch.Tensor | None) -> torch.Tensor:
    """The DiT's forward pass over `blocks` (one per spec, in order)."""
    skips: list[torch.Tensor] = []
    for spec, block in zip(specs, blocks):
        role = KINDS[spec.kind].role
        if role == "time":
            temb = block(t)
            continue
        if role == "patchify":
            h = block(x)
        elif role == "dit":
            h = block(h, temb, context, spec.hw)
        elif role == "resample":
            h = block(h, spec.hw)
        elif role == "fuse":
            h = block(torch.cat([h, skips.pop()], dim=-1))
        else:  # final: tokens back to the latent
            h = block(h, temb, spec.hw)
        if spec.skip == "push":
            skips.append(h)
    return h


def forward_of(cfg: Config) -> Callable:
    """The forward-pass function of `cfg`'s family."""
    return run_dit if isinstance(cfg, DiTConfig) else run_unet


class BlockNet(nn.Module):
    """A network built from exactly the blocks `decompose(cfg)` lists, in that order:
    forward(x: (B, latent_ch, H, W), t: (B,), context: (B, L, context_dim)) -> shaped like x."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.specs: list[BlockSpec] = decompose(cfg)
        self.blocks = nn.ModuleDict({module_name(s): s.build() for s in self.specs})
        self._run = forward_of(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(self.specs, list(self.blocks.values()), x, t, context)


class UNet(BlockNet):
    """A SnapGen-family UNet (an ArchConfig)."""


class DiT(BlockNet):
    """A SnapGen++-style three-stage DiT (a DiTConfig)."""


def module_name(spec: BlockSpec) -> str:
    """A block's key in a network's `blocks` (its position, dots made underscores)."""
    return spec.name.replace(".", "_")


def build_model(cfg: Config) -> BlockNet:
    """The UNet or the DiT of `cfg`."""
    return DiT(cfg) if isinstance(cfg, DiTConfig) else UNet(cfg)
