"""The proxy training's settings, each described once: its default, what it means, and its valid
values. The CLI's training flags, the presets' checks and `TrainConfig.validate` all read them from
here, and this module imports no torch (so `archlab --help` stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass

from archlab.errors import ArchlabError
from archlab.schema import at_least, check, describe, positive, setting

INITS = ("shared", "sequential")
TIMESTEPS = ("logit_normal", "uniform")
LR_SCHEDULES = ("constant", "cosine")
EXTRACTORS = ("auto", "inception", "randconv")
# settings that do not change the trained weights: a checkpoint made with other values is resumed
NOT_TRAINING = ("steps", "val_images", "samples", "sample_steps", "cfg_scale", "fid_extractor", "fid_reference",
                "checkpoint_every", "report_every", "device", "threads")
# what a preset may not set (the seed, the device and the bookkeeping are the run's, not the proxy's)
NOT_PRESET = ("seed", "device", "threads", "checkpoint_every", "report_every")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = setting(500, "training steps", at_least(0), ">= 0")
    batch: int = setting(32, "images per step", at_least(1), ">= 1")
    lr: float = setting(3e-4, "AdamW learning rate", positive, "> 0")
    weight_decay: float = setting(0.01, "AdamW weight decay", at_least(0), ">= 0")
    warmup: int = setting(50, "linear learning-rate warm-up steps", at_least(0), ">= 0")
    lr_schedule: str = setting("constant", "learning rate after the warm-up: constant, or cosine (decays to 0 at the "
                                           "last step, so --steps then changes what is learnt)", choices=LR_SCHEDULES)
    grad_clip: float = setting(1.0, "gradient norm clip", positive, "> 0")
    ema: float = setting(0.999, "EMA decay of the scored weights", lambda v: 0 <= v < 1, "in [0, 1)")
    timesteps: str = setting("logit_normal", "training timestep distribution", choices=TIMESTEPS)
    mu: float = setting(0.0, "logit-normal timestep mean")
    sigma: float = setting(1.0, "logit-normal timestep std", positive, "> 0")
    label_dropout: float = setting(0.1, "probability of the null class (classifier-free guidance)",
                                    lambda v: 0 <= v < 1, "in [0, 1)")
    width_mult: float = setting(0.125, "proxy width: channels and head dim x this", positive, "> 0")
    context_dim: int = setting(64, "dimension of the class's context tokens", at_least(1), ">= 1")
    context_len: int = setting(4, "context tokens per class", at_least(1), ">= 1")
    seed: int = setting(0, "training seed")
    init: str = setting("shared", "shared: each module's initial weights seeded by its path, so designs share "
                                   "common blocks' init; sequential: one generator in build order", choices=INITS)
    # scoring
    val_images: int = setting(256, "held-out images of the validation loss", at_least(1), ">= 1")
    samples: int = setting(250, "generated images for FID/KID, 0: skip", lambda v: v == 0 or v >= 2, "0 or >= 2")
    sample_steps: int = setting(20, "Euler steps when sampling", at_least(1), ">= 1")
    cfg_scale: float = setting(2.0, "classifier-free guidance scale when sampling")
    fid_extractor: str = setting("auto", "FID/KID features: auto (inception if installed), inception, randconv",
                                  choices=EXTRACTORS)
    fid_reference: int = setting(1000, "real validation images (balanced over classes) FID/KID compare against",
                                  at_least(2), ">= 2")
    # bookkeeping
    checkpoint_every: int = setting(200, "steps between checkpoints", at_least(1), ">= 1")
    report_every: int = setting(25, "steps between reported training losses", at_least(1), ">= 1")
    device: str = setting("cpu", "torch device (cpu, cuda, ...)")
    threads: int | None = setting(None, "torch intra-op threads while training (None: leave torch's setting)",
                                   lambda v: v is None or v >= 1, ">= 1")

    def lr_at(self, step: int) -> float:
        """The learning rate of training step `step` (0-based): linear warm-up, then the schedule."""
        import math

        lr = self.lr * min(1.0, (step + 1) / max(1, self.warmup))
        if self.lr_schedule == "cosine" and step >= self.warmup:
            lr *= 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / max(1, self.steps - self.warmup)))
        return lr

    def training_identity(self) -> dict:
        """The settings a checkpoint must share to be resumed: all that change the trained weights (the
        step count too when the learning rate decays towards the last step)."""
        from dataclasses import asdict

        keep = ("steps",) if self.lr_schedule != "constant" else ()
        return {k: v for k, v in asdict(self).items() if k not in NOT_TRAINING or k in keep}

    def validate(self) -> None:
        """Every setting in its range (one line naming the first that is not), and the device usable."""
        check(self, "train")
        import torch

        try:
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ArchlabError(f"train: device={self.device!r} is not usable here ({e})") from None


def preset_settings() -> dict[str, dict]:
    """The settings a proxy preset holds (each also a flag of train, search, ablate that overrides it)."""
    return {k: v for k, v in describe(TrainConfig).items() if k not in NOT_PRESET}
