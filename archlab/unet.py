"""The UNet: assembled from exactly the blocks `decompose(cfg)` lists, run in that order."""

from __future__ import annotations

import torch

from archlab.models import BlockNet


class UNet(BlockNet):
    """forward(x: (B, latent_ch, H, W), t: (B,), context: (B, L, context_dim)) -> (B, latent_ch, H, W)."""

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
