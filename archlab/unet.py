"""The UNet: assembled from exactly the blocks `decompose(cfg)` lists, run in that order."""

from __future__ import annotations

import torch
from torch import nn

from archlab.config import ArchConfig
from archlab.decompose import BlockSpec, decompose
from archlab.kinds import KINDS


class UNet(nn.Module):
    """forward(x: (B, latent_ch, H, W), t: (B,), context: (B, L, context_dim)) -> (B, latent_ch, H, W)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.config = cfg
        self.specs: list[BlockSpec] = decompose(cfg)
        self.blocks = nn.ModuleDict({s.name.replace(".", "_"): s.build() for s in self.specs})
        self.roles = [KINDS[s.kind].role for s in self.specs]  # how each block is run (archlab.kinds)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        h = x
        for spec, role, block in zip(self.specs, self.roles, self.blocks.values()):
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
