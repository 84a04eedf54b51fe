"""The SnapGen++-style DiT: assembled from exactly the blocks `decompose(cfg)` lists, run in that order.

    latent -> patch_embed -> Down blocks -> resample -> Middle blocks -> resample -> Up blocks -> final

Token blocks run on their stage's token grid (the block's `hw`); every DiT block sees the timestep
embedding and the context tokens. A long skip (`DiTConfig.skips`) joins where its `fuse` block is: the
block marked `push` gives its output, the `fuse` (marked `pop`) concatenates it and maps it back.
"""

from __future__ import annotations

import torch

from archlab.models import BlockNet


class DiT(BlockNet):
    """forward(x: (B, latent_ch, H, W), t: (B,), context: (B, L, context_dim)) -> (B, latent_ch, H, W)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for spec, role, block in zip(self.specs, self.roles, self.blocks.values()):
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
