"""The network a config describes, whatever its family."""

from __future__ import annotations

from torch import nn

from archlab.config import Config, DiTConfig
from archlab.decompose import BlockSpec, decompose
from archlab.kinds import KINDS


class BlockNet(nn.Module):
    """A network built from exactly the blocks `decompose(cfg)` lists, in that order; its family's
    `forward` runs them by role (archlab.kinds)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.specs: list[BlockSpec] = decompose(cfg)
        self.blocks = nn.ModuleDict({s.name.replace(".", "_"): s.build() for s in self.specs})
        self.roles = [KINDS[s.kind].role for s in self.specs]


def build_model(cfg: Config) -> nn.Module:
    """The UNet or the DiT of `cfg`: forward(x, t, context) -> the prediction, shaped like x."""
    if isinstance(cfg, DiTConfig):
        from archlab.dit import DiT

        return DiT(cfg)
    from archlab.unet import UNet

    return UNet(cfg)
