"""Proxy training and scoring: a design, scaled down, trained briefly with rectified flow.

- The model: the candidate's config (UNet or DiT) at proxy scale (`proxy_arch`: pixels, 3 channels, the
  dataset's resolution, channels x `width_mult`, same topology) and the class as context tokens
  (a learned embedding of `context_len` tokens per class, plus a null class for classifier-free
  guidance; labels are dropped to it with probability `label_dropout` while training).
- Rectified flow: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0; t from a logit-normal
  (mu, sigma) or uniform. AdamW, EMA, gradient clipping. Every random draw of step k comes from a
  generator seeded by (seed, k), so a resumed run is the same run, and two runs with one seed match.
- Shared randomness between designs (common random numbers): with one seed, two different designs
  see the same batches, timesteps and noise (`draw_batch` does not depend on the model), and with
  `init="shared"` every module starts from weights drawn by a generator seeded by (seed, the module's
  path in the model): the blocks two designs have in common start identically. Their scores then
  differ by the design more than by luck, which is what a paired comparison over seeds measures.
- A non-finite loss or gradient ends the run with status `diverged` and the reason: a result, not an
  exception, so a search can record it and go on.
- Scores (on the EMA weights): the flow-matching validation loss on held-out images at fixed
  timesteps and noise, and FID / KID of Euler-sampled images (with CFG) against the real set.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from archlab.config import ArchConfig, Config
from archlab.data import ImageSet, to_model, to_uint8
from archlab.errors import ArchlabError
from archlab.io import atomic_path, folder_lock, save_atomic, write_atomic
from archlab.train_config import TrainConfig
from archlab.models import build_model

VAL_TIMESTEPS = 8  # validation loss: t = (i + 0.5) / 8, i = 0..7, for every held-out image
DIVERGED_LOSS = 50.0  # the target eps - x0 has a variance under 2 (a model that outputs 0 scores that): a batch
# loss 25x over it is a blow-up, however finite


@dataclass
class TrainResult:
    status: str  # ok | diverged
    reason: str
    steps: int
    seconds: float
    train_loss: float | None
    val_loss: float | None
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    fid_extractor: str | None = None
    score_seconds: float = 0.0  # validation loss, sampling and FID/KID, after training
    val_loss_t: list[float] = field(default_factory=list)  # the validation loss at each of the fixed timesteps
    params: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0  # the step of the checkpoint this run continued from (0: trained from scratch)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        return d


def proxy_arch(cfg: Config, resolution: int, t: TrainConfig) -> Config:
    """The design at proxy scale: pixels at `resolution`, channels x width_mult, same topology.
    GroupNorm groups scale with the width too, so each group keeps its number of channels."""
    values = {"latent.channels": 3, "latent.resolution": resolution, "width_mult": t.width_mult,
              "conditioning.context_dim": t.context_dim, "conditioning.context_len": t.context_len}
    if isinstance(cfg, ArchConfig):  # the UNet's GroupNorms (a DiT has none)
        values["norm_groups"] = max(1, round(cfg.norm_groups * t.width_mult))
    return cfg.with_values(values, where=f"{cfg.name} at proxy scale")


class ProxyModel(nn.Module):
    """The design's network (UNet or DiT) with the class as context tokens; class `num_classes` is the
    null class (CFG). The network is the `unet` attribute whatever its family: module paths, and so the
    shared initial weights of `init_seed`, stay as they were before the DiT family.

    `init_seed`: draw every module's initial weights from a generator of its own, seeded by
    (init_seed, the module's path), instead of from the global generator in build order. `net`: another
    network taking (x, t, context) instead of `build_model(arch)` (a supernet, archlab.elastic)."""

    def __init__(self, arch: Config, num_classes: int, init_seed: int | None = None, net: nn.Module | None = None):
        super().__init__()
        c = arch.conditioning
        self.arch, self.num_classes = arch, num_classes
        self.unet = build_model(arch) if net is None else net
        self.classes = nn.Embedding(num_classes + 1, c.context_len * c.context_dim)
        self._init_classes()
        if init_seed is not None:
            self.init_shared(init_seed)

    def _init_classes(self) -> None:
        nn.init.normal_(self.classes.weight, std=0.5)

    def init_shared(self, seed: int) -> None:
        """Each module's own parameters re-drawn (with their usual initialiser) from a generator seeded
        by (seed, module path): a block two designs have in common starts identically in both."""
        for name, m in self.named_modules():
            if next(m.parameters(recurse=False), None) is None:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little"))
                self._init_classes() if m is self.classes else m.reset_parameters()

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = self.arch.conditioning
        context = self.classes(labels).view(len(labels), c.context_len, c.context_dim)
        return self.unet(x, t * 1000, context)


def _gen(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


def sample_t(n: int, t: TrainConfig, g: torch.Generator) -> torch.Tensor:
    if t.timesteps == "uniform":
        return torch.rand(n, generator=g)
    return torch.sigmoid(t.mu + t.sigma * torch.randn(n, generator=g))


def draw_batch(data: ImageSet, t: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step `step`'s images (uint8), labels (some dropped to the null class), timesteps and noise: a
    function of (seed, step) and the data only, so every design trained with one seed sees the same."""
    g = _gen(t.seed, step)
    idx = torch.randint(len(data.train), (t.batch,), generator=g)
    labels = data.train_labels[idx].clone()
    labels[torch.rand(t.batch, generator=g) < t.label_dropout] = data.num_classes
    tt = sample_t(t.batch, t, g)
    eps = torch.randn((t.batch, *data.train.shape[1:]), generator=g)
    return data.train[idx], labels, tt, eps


def flow_loss(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * eps
    return torch.mean((model(xt, t, labels) - (eps - x0)) ** 2)


def _spread(labels: torch.Tensor) -> torch.Tensor:
    """Indices ordered round-robin over classes (1st of each class, then 2nd, ...): any prefix is balanced."""
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    return torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)


@torch.no_grad()
def validation_loss(model: nn.Module, data: ImageSet, n: int, device: str, batch: int = 64) -> list[float]:
    """Flow-matching loss on n held-out images (balanced over classes) with fixed noise, at each of the
    fixed timesteps t = (i + 0.5) / VAL_TIMESTEPS; the validation loss is their mean."""
    idx = _spread(data.val_labels)[:n]
    x, y = data.val[idx], data.val_labels[idx]
    g = torch.Generator().manual_seed(1234)
    eps_all = torch.randn((VAL_TIMESTEPS, *x.shape), generator=g)
    per_t = []
    model.eval()
    for i in range(VAL_TIMESTEPS):
        t_val = (i + 0.5) / VAL_TIMESTEPS
        total = 0.0
        for j in range(0, len(x), batch):
            xb = to_model(x[j:j + batch]).to(device)
            t = torch.full((len(xb),), t_val, device=device)
            loss = flow_loss(model, xb, y[j:j + batch].to(device), t, eps_all[i, j:j + batch].to(device))
            total += float(loss) * len(xb)
        per_t.append(total / len(x))
    return per_t


@torch.no_grad()
def sample(model: ProxyModel, labels: torch.Tensor, steps: int = 20, cfg_scale: float = 2.0, seed: int = 0,
           resolution: int | None = None, device: str = "cpu", batch: int = 64) -> torch.Tensor:
    """Euler ODE from noise (t=1) to data (t=0) with classifier-free guidance; returns uint8 images."""
    res = resolution or model.arch.latent.resolution
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), 3, res, res), generator=g)
    model.eval()
    out = []
    for j in range(0, len(labels), batch):
        x, y = noise[j:j + batch].to(device), labels[j:j + batch].to(device)
        null = torch.full_like(y, model.num_classes)
        for k in range(steps):
            t_now, t_next = 1 - k / steps, 1 - (k + 1) / steps
            t = torch.full((len(x),), t_now, device=device)
            if cfg_scale == 1.0:
                v = model(x, t, y)
            else:
                v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
                v = v_u + cfg_scale * (v_c - v_u)
            x = x + (t_next - t_now) * v
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def score(model: ProxyModel, data: ImageSet, t: TrainConfig, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """FID/KID of `t.samples` generated images (classes balanced) against `t.fid_reference` validation
    images; returns the scores and the generated images (uint8)."""
    labels = torch.arange(t.samples) % data.num_classes
    fake = sample(model, labels, t.sample_steps, t.cfg_scale, seed=t.seed + 99, device=t.device)
    return score_images(fake, data, t.fid_extractor, t.fid_reference, progress), fake


def reference_features(data: ImageSet, extractor_name: str = "auto", n: int | None = None, progress: bool = False):
    """(extractor, features of up to n validation images, balanced over classes): computed once, then
    cached on disk."""
    from archlab.metrics import extractor, real_features

    ext = extractor(extractor_name)
    images = data.val[_spread(data.val_labels)[:n]]
    return ext, real_features(ext, images, f"{data.key}-val{len(images)}of{len(data.val)}", progress=progress)


def prepare(data_cfg, t: TrainConfig) -> ImageSet:
    """Decode (and cache) a dataset and its FID reference statistics once, before parallel trials
    would each do it at the same time."""
    from archlab.data import load_dataset

    data = load_dataset(data_cfg, progress=True)
    if t.samples:
        reference_features(data, t.fid_extractor, t.fid_reference, progress=True)
    return data


def score_images(fake: torch.Tensor, data: ImageSet, extractor_name: str = "auto", n_real: int | None = None,
                 progress: bool = False) -> dict:
    """FID/KID of uint8 images against up to `n_real` validation images of `data`, with a named extractor."""
    from archlab.metrics import features, fid_kid

    ext, real = reference_features(data, extractor_name, n_real, progress)
    return {**fid_kid(real, features(ext, fake)), "fid_extractor": ext.name, "fid_reference": len(real)}


def save_samples(images: torch.Tensor, out: Path, columns: int = 16) -> None:
    """`samples.pt` (all generated images, uint8) and `samples.png` (a grid of up to 8 rows)."""
    from PIL import Image

    save_atomic(images, out / "samples.pt")
    n = min(len(images), columns * 8) // columns * columns
    if n:
        g = images[:n].view(n // columns, columns, *images.shape[1:]).permute(0, 3, 1, 4, 2)
        with atomic_path(out / "samples.png") as tmp:
            Image.fromarray(g.reshape(g.shape[0] * g.shape[1], -1, 3).numpy()).save(tmp)


class Checkpoint:
    """A training's checkpoint file in `out` (none without one), refused when made with other `settings`."""

    def __init__(self, out: Path | None, settings: dict):
        self.path = None if out is None else out / "checkpoint.pt"
        self.settings = settings

    def load(self):
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated, or not a torch file
            raise ArchlabError(f"{self.path}: cannot be read as a checkpoint ({type(e).__name__}); delete it or use "
                               "another --out") from None
        if not isinstance(state, dict) or "settings" not in state:
            raise ArchlabError(f"{self.path}: not an archlab training checkpoint; delete it or use another --out")
        if state["settings"] != self.settings:
            raise ArchlabError(f"{self.path}: made by a run with other settings; use another --out or delete it")
        return state

    def save(self, **state) -> None:
        if self.path is None:
            return
        save_atomic({"settings": self.settings, **state}, self.path)

    def resume(self, t: TrainConfig, model: nn.Module, ema: nn.Module, opt) -> dict | None:
        """Load the checkpoint's weights, EMA and optimizer state into these; its state, or None without one."""
        state = self.load()
        if state is not None:
            if state["step"] > t.steps:
                raise ArchlabError(f"{self.path}: the checkpoint is at step {state['step']}, past --steps {t.steps}")
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
        return state


def optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model: weight decay on matrices and kernels, none on biases, norms, the class embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.startswith("classes") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.99))


def update(model: nn.Module, ema: nn.Module, opt, t: TrainConfig, step: int) -> str:
    """After backward: clip the gradients, step, move the EMA towards the weights. Returns why the run
    diverged (a non-finite gradient norm), or ''."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    if not torch.isfinite(norm):
        return f"gradient norm is {float(norm)} at step {step}"
    opt.step()
    d = min(t.ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)
    return ""


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to n inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(arch: Config, data: ImageSet, t: TrainConfig, out: str | Path | None = None, *, progress: bool = False,
          on_report: Callable[[int, dict], None] | None = None, with_scores: bool = True,
          init: dict | None = None) -> TrainResult:
    """Train `arch` at proxy scale on `data` for `t.steps` steps, then score it.

    `out`: a folder for the checkpoint (resumed from if present, also to train a run for longer),
    `result.json` and the generated images (`samples.pt`, `samples.png`); one training at a time holds it.
    `on_report(step, {"train_loss"})` is called every `t.report_every` steps (Ray Tune reports here).
    `init`: start from these weights (a `ProxyModel` state dict, e.g. inherited from a supernet) instead
    of fresh ones.
    """
    t.validate()
    if with_scores and t.samples:
        from archlab.metrics import extractor

        extractor(t.fid_extractor)  # a missing FID network fails now, not after training
    with torch_threads(t.threads), (folder_lock(out) if out else contextlib.nullcontext()):
        return _train(arch, data, t, out, progress, on_report, with_scores, init)


def _train(arch, data, t, out, progress, on_report, with_scores, init) -> TrainResult:
    from tqdm import tqdm

    torch.manual_seed(t.seed)
    proxy = proxy_arch(arch, data.resolution, t)
    model = ProxyModel(proxy, data.num_classes, init_seed=t.seed if t.init == "shared" else None).to(t.device)
    if init is not None:
        model.load_state_dict(init)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = optimizer(model, t)
    settings = {"arch": proxy.to_dict(), "data": data.key, "train": t.training_identity()}
    if init is not None:  # a checkpoint resumes only the run that started from the same weights
        settings["init"] = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in init.values())).hexdigest()[:16]
    ckpt = Checkpoint(Path(out) if out else None, settings)
    step, history, smooth, before = 0, [], None, 0.0
    state = ckpt.resume(t, model, ema, opt)
    resumed_from = 0 if state is None else state["step"]
    if state is not None:
        step, history, smooth, before = state["step"], state["history"], state["smooth"], state["seconds"]

    start = time.time()
    status, reason = "ok", ""
    bar = tqdm(total=t.steps, initial=step, desc="training", unit="step", disable=not progress)
    while step < t.steps:
        images, labels, tt, eps = draw_batch(data, t, step)
        x0, tt, eps = to_model(images).to(t.device), tt.to(t.device), eps.to(t.device)
        for group in opt.param_groups:
            group["lr"] = t.lr_at(step)
        model.train()
        loss = flow_loss(model, x0, labels.to(t.device), tt, eps)
        if not torch.isfinite(loss) or loss.item() > DIVERGED_LOSS:
            status, reason = "diverged", f"loss is {loss.item():.4g} at step {step}"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        reason = update(model, ema, opt, t, step)
        if reason:
            status = "diverged"
            break
        step += 1
        value = loss.item()
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        bar.update()
        bar.set_postfix(loss=f"{smooth:.4f}")
        if step % t.report_every == 0 or step == t.steps:
            history.append((step, smooth))
        if step % t.checkpoint_every == 0 or step == t.steps:
            ckpt.save(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                      history=history, smooth=smooth, seconds=before + time.time() - start)
        if on_report and (step % t.report_every == 0 or step == t.steps):
            on_report(step, {"train_loss": smooth})
    bar.close()
    params = sum(p.numel() for p in model.parameters())
    result = TrainResult(status, reason, step, before + time.time() - start, smooth, None, params=params, history=history,
                         resumed_from=resumed_from)
    scoring = time.time()
    if status == "ok":
        result.val_loss_t = validation_loss(ema, data, t.val_images, t.device)
        result.val_loss = sum(result.val_loss_t) / len(result.val_loss_t)
        if with_scores and t.samples:
            s, fake = score(ema, data, t, progress)
            result.fid, result.kid, result.kid_std, result.fid_extractor = s["fid"], s["kid"], s["kid_std"], s["fid_extractor"]
            if out:
                save_samples(fake, Path(out))
        bad = {k: v for k, v in (("val_loss", result.val_loss), ("fid", result.fid), ("kid", result.kid))
               if v is not None and not math.isfinite(v)}
        if bad:  # the weights went bad without the training loss showing it
            result.status, result.reason = "diverged", "non-finite scores: " + ", ".join(f"{k}={v}" for k, v in bad.items())
            result.val_loss = result.fid = result.kid = result.kid_std = None
    result.score_seconds = time.time() - scoring
    if out:
        val = {"images": min(t.val_images, len(data.val)), "selection": "balanced over classes", "timesteps": VAL_TIMESTEPS}
        write_atomic(Path(out) / "result.json",
                     json.dumps({**result.to_dict(), "settings": settings, "val": val}, indent=1) + "\n")
    return result
