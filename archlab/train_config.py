"""The proxy training's settings, each described once: its default, what it means, and its valid
values. The CLI's training flags, the presets' checks and `TrainConfig.validate` all read them from
here, and this module imports no torch (so `archlab --help` stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

from archlab.errors import ArchlabError

INITS = ("shared", "sequential")
TIMESTEPS = ("logit_normal", "uniform")
EXTRACTORS = ("auto", "inception", "randconv")
# settings that do not change the trained weights: a checkpoint made with other values is resumed
NOT_TRAINING = ("steps", "val_images", "samples", "sample_steps", "cfg_scale", "fid_extractor", "fid_reference",
                "checkpoint_every", "report_every", "device", "threads")
# what a preset may not set (the seed, the device and the bookkeeping are the run's, not the proxy's)
NOT_PRESET = ("seed", "device", "threads", "checkpoint_every", "report_every")


def _setting(default: Any, help: str, valid: Callable[[Any], bool] | None = None, rule: str = "",
             choices: tuple = ()) -> Any:
    return field(default=default, metadata={"help": help, "valid": valid, "rule": rule, "choices": choices})


def _positive(v) -> bool:
    return v > 0


def _at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: v >= n


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _setting(500, "training steps", _at_least(0), ">= 0")
    batch: int = _setting(32, "images per step", _at_least(1), ">= 1")
    lr: float = _setting(3e-4, "AdamW learning rate", _positive, "> 0")
    weight_decay: float = _setting(0.01, "AdamW weight decay", _at_least(0), ">= 0")
    warmup: int = _setting(50, "linear learning-rate warm-up steps", _at_least(0), ">= 0")
    grad_clip: float = _setting(1.0, "gradient norm clip", _positive, "> 0")
    ema: float = _setting(0.999, "EMA decay of the scored weights", lambda v: 0 <= v < 1, "in [0, 1)")
    timesteps: str = _setting("logit_normal", "training timestep distribution", choices=TIMESTEPS)
    mu: float = _setting(0.0, "logit-normal timestep mean")
    sigma: float = _setting(1.0, "logit-normal timestep std", _positive, "> 0")
    label_dropout: float = _setting(0.1, "probability of the null class (classifier-free guidance)",
                                    lambda v: 0 <= v < 1, "in [0, 1)")
    width_mult: float = _setting(0.125, "proxy width: channels and head dim x this", _positive, "> 0")
    context_dim: int = _setting(64, "dimension of the class's context tokens", _at_least(1), ">= 1")
    context_len: int = _setting(4, "context tokens per class", _at_least(1), ">= 1")
    seed: int = _setting(0, "training seed")
    init: str = _setting("shared", "shared: each module's initial weights seeded by its path, so designs share "
                                   "common blocks' init; sequential: one generator in build order", choices=INITS)
    # scoring
    val_images: int = _setting(256, "held-out images of the validation loss", _at_least(1), ">= 1")
    samples: int = _setting(250, "generated images for FID/KID, 0: skip", lambda v: v == 0 or v >= 2, "0 or >= 2")
    sample_steps: int = _setting(20, "Euler steps when sampling", _at_least(1), ">= 1")
    cfg_scale: float = _setting(2.0, "classifier-free guidance scale when sampling")
    fid_extractor: str = _setting("auto", "FID/KID features: auto (inception if installed), inception, randconv",
                                  choices=EXTRACTORS)
    fid_reference: int = _setting(1000, "real validation images (balanced over classes) FID/KID compare against",
                                  _at_least(2), ">= 2")
    # bookkeeping
    checkpoint_every: int = _setting(200, "steps between checkpoints", _at_least(1), ">= 1")
    report_every: int = _setting(25, "steps between reported training losses", _at_least(1), ">= 1")
    device: str = _setting("cpu", "torch device (cpu, cuda, ...)")
    threads: int | None = _setting(None, "torch intra-op threads while training (None: leave torch's setting)",
                                   lambda v: v is None or v >= 1, ">= 1")

    def validate(self) -> None:
        """Every setting in its range (one line naming the first that is not), and the device usable."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ArchlabError(f"train: {f.name}={value!r} is out of range (one of {', '.join(meta['choices'])})")
            if meta["valid"] is not None and not meta["valid"](value):
                raise ArchlabError(f"train: {f.name}={value!r} is out of range (must be {meta['rule']})")
        import torch

        try:
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ArchlabError(f"train: device={self.device!r} is not usable here ({e})") from None


def settings() -> dict[str, dict]:
    """Every TrainConfig field: {name: {type, default, help, choices}} (what flags and presets are made from)."""
    import typing

    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        kind = hints[f.name]
        if kind not in (int, float, str, bool):  # `int | None`
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        out[f.name] = {"type": kind, "default": f.default, "help": f.metadata["help"], "choices": f.metadata["choices"]}
    return out


def preset_settings() -> dict[str, dict]:
    """The settings a proxy preset holds (each also a flag of train, search, ablate that overrides it)."""
    return {k: v for k, v in settings().items() if k not in NOT_PRESET}
