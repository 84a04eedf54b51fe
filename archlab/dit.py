"""The SnapGen++-style DiT: assembled from exactly the blocks `decompose(cfg)` lists.

    latent -> patch_embed -> Down blocks -> resample -> Middle blocks -> resample -> Up blocks -> final

on the token grid of each stage (`DiTConfig.grid`); every block sees the timestep embedding and the
context tokens. The long skips (`DiTConfig.skips`) join by concatenation and a `fuse` layer.
"""

from __future__ import annotations

import torch
from torch import nn

from archlab.config import DiTConfig
from archlab.decompose import BlockSpec, decompose


class DiT(nn.Module):
    """forward(x: (B, latent_ch, H, W), t: (B,), context: (B, L, context_dim)) -> (B, latent_ch, H, W)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.specs: list[BlockSpec] = decompose(cfg)
        self.blocks = nn.ModuleDict({s.name.replace(".", "_"): s.build() for s in self.specs})

    def _get(self, name: str) -> nn.Module | None:
        key = name.replace(".", "_")
        return self.blocks[key] if key in self.blocks else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        temb = self.blocks["time_embed"](t)
        h = self.blocks["patch_embed"](x)
        down_out = h
        for i, stage in enumerate(("down", "middle", "up")):
            n = cfg.grid(i)
            hw, outs = (n, n), []
            if i == 2 and cfg.skips == "u":
                h = self.blocks["up_fuse"](torch.cat([h, down_out], dim=-1))
            for j in range(cfg.stages[i].depth):
                fuse = self._get(f"{stage}.{j}.fuse")
                if fuse is not None:  # dense: block j is joined by block depth-1-j's output
                    h = fuse(torch.cat([h, outs[cfg.stages[i].depth - 1 - j]], dim=-1))
                h = self.blocks[f"{stage}_{j}"](h, temb, context, hw)
                outs.append(h)
            if i == 0:
                down_out = h
            resample = self._get(f"{stage}.resample")
            if resample is not None:
                h = resample(h, hw)
        return self.blocks["final"](h, temb, (cfg.tokens, cfg.tokens))
