"""The network a config describes, whatever its family."""

from __future__ import annotations

from torch import nn

from archlab.config import Config, DiTConfig


def build_model(cfg: Config) -> nn.Module:
    """The UNet or the DiT of `cfg`: forward(x, t, context) -> the prediction, shaped like x."""
    if isinstance(cfg, DiTConfig):
        from archlab.dit import DiT

        return DiT(cfg)
    from archlab.unet import UNet

    return UNet(cfg)
