"""A search space's weight-shared supernet: trained once, then any sub-network scored in seconds.

`train_supernet` trains one `Elastic` network (archlab.elastic) holding every design of a space at
proxy scale. Each step draws sub-networks by a sampling rule and trains them all on one batch:

- `sandwich` (the default; BigNAS, SnapGen++): the largest sub-net, the smallest, and `random_subnets`
  drawn uniformly from the space; `uniform`: only random ones. Largest and smallest are by parameters.
- in-place distillation (sandwich only): every sub-net but the largest also regresses the largest's
  prediction, detached. `fixed` (the default): task + w * kd; `adaptive`: task + min(w, task / kd) * kd,
  SnapGen's rescaling of the kd term to the task loss's size, capped at w: uncapped, a sub-net that
  shares its weights with the teacher sits close to it (a tiny kd), the ratio explodes, and the
  supernet did not learn (docs/weight-sharing.md); `none`.
- the sub-nets' losses are averaged into one update (AdamW, gradient clipping, EMA as `archlab.train`).

Everything of step k is a function of (seed, k): the batch (`archlab.train.draw_batch`) and the
sub-nets drawn, so a run killed at any moment resumes from its checkpoint to the same weights, bit for
bit. The scored weights are the EMA's. A sub-network is scored by extracting it (an ordinary
`ProxyModel`, as `archlab train` builds) and running `archlab.train.validation_loss` on it: the same
code, images, timesteps and noise as a trained design, so the two scores differ only by the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from archlab.cluster import TrialSettings
from archlab.errors import ArchlabError
from archlab.io import save_atomic, write_atomic
from archlab.schema import at_least, build, setting

RULES = ("sandwich", "uniform")
DISTILL = ("fixed", "adaptive", "none")
SETTINGS = "supernet.json"


@dataclass
class SupernetSettings(TrialSettings):
    """A supernet training: the space (its YAML mapping, so a worker needs no file), the rule, the
    distillation and the proxy's training settings (`train`, from a preset); saved as `supernet.json`."""
    space: dict = field(default_factory=dict)
    space_path: str = ""  # where the space was read from (for people; the mapping above is what counts)
    proxy: str = "cpu"  # the preset `train` and the image size came from (for people)
    rule: str = setting("sandwich", choices=RULES)
    random_subnets: int = setting(2, valid=at_least(0), rule=">= 0")
    distill: str = setting("fixed", choices=DISTILL)
    distill_weight: float = setting(1.0, valid=at_least(0), rule=">= 0")
    snapshot_every: int = setting(0, valid=at_least(0), rule=">= 0")  # keep the EMA weights every N steps (0: no)

    def validate(self) -> None:
        self.validate_trials()
        if self.rule == "uniform" and self.distill != "none":
            raise ArchlabError(f"--distill {self.distill}: in-place distillation needs the largest sub-net in each "
                               "step (--rule sandwich), or use --distill none")
        if self.rule == "uniform" and self.random_subnets < 1:
            raise ArchlabError("--random-subnets: --rule uniform needs at least 1")
        self.search_space()

    def search_space(self):
        from archlab.space import space_from_dict

        return space_from_dict(self.space, self.space_path or "supernet space")

    def identity(self) -> dict:
        """What a checkpoint must share to be resumed: all but the bookkeeping and the step count."""
        from archlab.train_config import TrainConfig

        return {"space": self.space, "data": self.data, "train": TrainConfig(**self.train).training_identity(),
                **{k: getattr(self, k) for k in ("rule", "random_subnets", "distill", "distill_weight")}}


# ---- the supernet of a space --------------------------------------------------------------------

def proxy_space(space, resolution: int, t):
    """The space with its base at proxy scale (the same points give the proxy-scale designs)."""
    from archlab.train import proxy_arch

    return dataclasses.replace(space, base=proxy_arch(space.base, resolution, t))


def supernet_model(space, num_classes: int, seed: int):
    """A `ProxyModel` whose network is the `Elastic` supernet of the (proxy-scale) space."""
    import torch

    from archlab.config import DiTConfig
    from archlab.elastic import Elastic
    from archlab.train import ProxyModel

    net = Elastic("dit" if isinstance(space.base, DiTConfig) else "unet", space.block_variants(), seed)
    torch.manual_seed(seed)  # the class embedding
    return ProxyModel(space.base, num_classes, net=net)


def extremes(space) -> tuple[dict, dict]:
    """The space's largest and smallest points by parameters (each parameter set in turn to its largest
    or smallest choice, twice over, so choices that only matter together settle)."""
    from archlab.elastic import param_count

    out = []
    for pick in (max, min):
        point = {p.path: p.choices[0] for p in space.params}
        for _ in range(2):
            for p in space.params:
                sized = []
                for c in p.choices:
                    try:
                        sized.append((param_count(space.config({**point, p.path: c})), c))
                    except ArchlabError:
                        continue
                point[p.path] = pick(sized, key=lambda s: s[0])[1]
        out.append(point)
    return out[0], out[1]


def draw_subnets(space, settings: SupernetSettings, seed: int, step: int, extreme: tuple[dict, dict]) -> list[dict]:
    """The points trained at `step`: (largest, smallest,) then the random ones; a function of (seed, step)."""
    points = list(extreme) if settings.rule == "sandwich" else []
    rng = random.Random(f"{seed}|{step}")
    for _ in range(settings.random_subnets):
        for _ in range(100):
            point = space.sample_point(rng)
            try:
                space.config(point)
                break
            except ArchlabError:  # an invalid combination: draw again
                continue
        points.append(point)
    return points


# ---- training -----------------------------------------------------------------------------------

def train_supernet(settings: SupernetSettings, data, out: str | Path | None, *, progress: bool = False,
                   on_report: Callable[[int, dict], None] | None = None) -> dict:
    """Train the supernet of `settings.space` on `data` for `train.steps` steps (resuming from `out`'s
    checkpoint); returns the result (also `out/result.json`): status, losses, the largest and smallest
    sub-nets' validation losses, seconds. `on_report(step, losses)` every `report_every` steps."""
    from archlab.train import TrainConfig, torch_threads

    t = TrainConfig(**settings.train)
    t.validate()
    with torch_threads(t.threads):
        return _train(settings, data, t, Path(out) if out else None, progress, on_report)


def _train(settings, data, t, out, progress, on_report) -> dict:
    import torch
    from tqdm import tqdm

    from archlab.data import to_model
    from archlab.train import DIVERGED_LOSS, Checkpoint, draw_batch, optimizer, update, validation_loss

    space = proxy_space(settings.search_space(), data.resolution, t)
    extreme = extremes(space)
    model = supernet_model(space, data.num_classes, t.seed).to(t.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = optimizer(model, t)
    ckpt = Checkpoint(out, {"supernet": settings.identity(), "data": data.key})
    step, history, smooth, before = 0, [], {}, 0.0
    state = ckpt.resume(t, model, ema, opt)
    resumed_from = 0 if state is None else state["step"]
    if state is not None:
        step, history, smooth, before = state["step"], state["history"], state["smooth"], state["seconds"]

    names = (["largest", "smallest"] if settings.rule == "sandwich" else []) + ["random"] * settings.random_subnets
    start, status, reason = time.time(), "ok", ""
    bar = tqdm(total=t.steps, initial=step, desc="supernet", unit="step", disable=not progress)
    while step < t.steps:
        images, labels, tt, eps = draw_batch(data, t, step)
        x0, labels, tt, eps = to_model(images).to(t.device), labels.to(t.device), tt.to(t.device), eps.to(t.device)
        xt = (1 - tt.view(-1, 1, 1, 1)) * x0 + tt.view(-1, 1, 1, 1) * eps
        target = eps - x0
        for group in opt.param_groups:
            group["lr"] = t.lr_at(step)
        model.train()
        opt.zero_grad(set_to_none=True)
        teacher, losses = None, {}
        points = draw_subnets(space, settings, t.seed, step, extreme)
        for who, point in zip(names, points):
            model.unet.activate(space.config(point))
            pred = model(xt, tt, labels)
            task = torch.mean((pred - target) ** 2)
            loss = task
            if teacher is not None and settings.distill != "none":
                kd = torch.mean((pred - teacher) ** 2)
                w = settings.distill_weight
                if settings.distill == "adaptive":
                    w = min(w, float(task.detach() / kd.detach().clamp_min(1e-12)))
                loss = task + w * kd
            if not torch.isfinite(loss) or loss.item() > DIVERGED_LOSS:
                status, reason = "diverged", f"the {who} sub-net's loss is {loss.item():.4g} at step {step}"
                break
            (loss / len(points)).backward()
            if who == "largest":
                teacher = pred.detach()
            losses.setdefault(who, []).append(task.item())
        if status != "ok":
            break
        reason = update(model, ema, opt, t, step)
        if reason:
            status = "diverged"
            break
        step += 1
        for who, values in losses.items():
            v = sum(values) / len(values)
            smooth[who] = v if who not in smooth else 0.95 * smooth[who] + 0.05 * v
        bar.update()
        bar.set_postfix({k: f"{v:.4f}" for k, v in smooth.items()})
        if step % t.report_every == 0 or step == t.steps:
            history.append({"step": step, **smooth})
            if on_report:
                on_report(step, {"train_loss": next(iter(smooth.values())), **{f"loss_{k}": v for k, v in smooth.items()}})
        if out and settings.snapshot_every and step % settings.snapshot_every == 0:
            save_atomic({"step": step, "ema": ema.state_dict(), "seconds": before + time.time() - start},
                        out / "snapshots" / f"ema-{step}.pt")
        if step % t.checkpoint_every == 0 or step == t.steps:
            ckpt.save(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                      history=history, smooth=smooth, seconds=before + time.time() - start)
    bar.close()
    result = {"status": status, "reason": reason, "steps": step, "seconds": before + time.time() - start,
              "resumed_from": resumed_from, "history": history, "largest": extreme[0], "smallest": extreme[1],
              "supernet_params": sum(w.numel() for w in model.unet.weights)}
    scoring = time.time()
    if status == "ok":
        for who, point in zip(("largest", "smallest"), extreme):
            sub = subnet(ema, space.config(point))
            per_t = validation_loss(sub, data, t.val_images, t.device)
            result[f"val_loss_{who}"] = sum(per_t) / len(per_t)
            result[f"params_{who}"] = sum(p.numel() for p in sub.parameters())
    result["score_seconds"] = time.time() - scoring
    if out:
        write_atomic(out / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def subnet(model, cfg):
    """The sub-network of `cfg` (proxy scale) extracted from a supernet `ProxyModel`: an ordinary
    `ProxyModel` with the inherited weights."""
    import torch

    from archlab.train import ProxyModel

    with torch.device("meta"):
        sub = ProxyModel(cfg, model.num_classes)
    state = {f"unet.{k}": v for k, v in model.unet.extract(cfg).items()}
    sub.load_state_dict({**state, "classes.weight": model.classes.weight.detach().clone()}, assign=True)
    return sub


# ---- a trained supernet -------------------------------------------------------------------------

def read_settings(folder: str | Path) -> SupernetSettings:
    """A supernet folder's settings; a folder without them, or damaged ones, is a one-line error."""
    path = Path(folder) / SETTINGS
    if not path.is_file():
        raise ArchlabError(f"{folder}: not a supernet folder (no {SETTINGS}; make one with `archlab supernet train`)")
    try:
        return build(SupernetSettings, json.loads(path.read_text()), str(path))
    except ValueError as e:
        raise ArchlabError(f"{path}: not a readable supernet settings file ({str(e).splitlines()[0][:160]})") from None


class Supernet:
    """A trained supernet folder: its space at proxy scale, its data, and its EMA weights (the final
    ones, or a snapshot's at `step`), on `device` with `threads` torch threads (default: as trained).
    `score(cfg)` is a design's inherited validation loss."""

    def __init__(self, folder: str | Path, step: int | None = None, device: str = "cpu", threads: int | None = None):
        import torch

        from archlab.data import load_dataset
        from archlab.train import TrainConfig

        self.folder, self.settings = Path(folder), read_settings(folder)
        self.train = TrainConfig(**{**self.settings.train, "device": device,
                                    "threads": threads or self.settings.train.get("threads")})
        path = self.folder / ("checkpoint.pt" if step is None else f"snapshots/ema-{step}.pt")
        if not path.is_file():
            held = sorted(int(p.stem.split("-")[1]) for p in (self.folder / "snapshots").glob("ema-*.pt"))
            raise ArchlabError(f"{path}: no such {'checkpoint' if step is None else 'snapshot'} "
                               f"(snapshots at steps: {', '.join(map(str, held)) or 'none'})")
        state = torch.load(path, map_location=device, weights_only=False)
        self.step, self.seconds = state["step"], state.get("seconds")  # seconds: training time to this step
        self.data = load_dataset(self.settings.data_config)
        self.space = proxy_space(self.settings.search_space(), self.data.resolution, self.train)
        self.model = supernet_model(self.space, self.data.num_classes, self.train.seed).to(device)
        self.model.load_state_dict(state["ema"])
        self.model.requires_grad_(False)

    def proxy(self, cfg):
        """A design (any scale) at this supernet's proxy scale."""
        from archlab.train import proxy_arch

        return proxy_arch(cfg, self.data.resolution, self.train)

    def extract(self, cfg):
        """The design's sub-network with its inherited weights (a `ProxyModel`); one line if the supernet
        does not hold it."""
        return subnet(self.model, self.proxy(cfg))

    def check(self, cfg) -> None:
        """Raise (one line naming the block) unless the supernet holds the design."""
        self.model.unet.plan(self.proxy(cfg))

    def score(self, cfg, images: int | None = None) -> dict:
        """The design's validation loss with inherited weights on `images` held-out images (default: the
        supernet's preset's), with its per-timestep values and the seconds it took."""
        from archlab.train import torch_threads, validation_loss

        start = time.time()
        with torch_threads(self.train.threads):
            per_t = validation_loss(self.extract(cfg), self.data, images or self.train.val_images, self.train.device)
        return {"val_loss": sum(per_t) / len(per_t), "val_loss_t": per_t, "seconds": time.time() - start}

    def finetune(self, cfg, steps: int, images: int | None = None) -> dict:
        """The design trained `steps` steps from its inherited weights (the supernet's training settings
        and seed), then scored like `score`."""
        from archlab.train import train

        t = dataclasses.replace(self.train, steps=steps, warmup=min(self.train.warmup, steps), samples=0,
                                val_images=images or self.train.val_images)
        init = self.extract(cfg).state_dict()
        r = train(cfg, self.data, t, with_scores=False, init=init)
        if r.status != "ok":
            return {"val_loss": None, "status": r.status, "reason": r.reason, "seconds": r.seconds}
        return {"val_loss": r.val_loss, "val_loss_t": r.val_loss_t, "seconds": r.seconds + r.score_seconds}


def make_settings(space_path: str | Path, base: TrialSettings, proxy: str, **options: Any) -> SupernetSettings:
    """The settings of a new supernet training of the space at `space_path`."""
    from archlab.config import read_yaml
    from archlab.elastic import holds
    from archlab.space import load_space

    space = load_space(space_path)  # a bad space fails now, with its file's name
    fields = {**asdict(base), "train": {**base.train, "samples": 0}}  # sub-nets are scored by validation loss
    s = SupernetSettings(**fields, space=read_yaml(space_path), space_path=str(space_path), proxy=proxy, **options)
    s.validate()
    s.locate_data()
    holds(proxy_space(space, s.data_config.resolution, s.train_config).block_variants())  # fails here, not in a trial
    return s


def job(settings: SupernetSettings, out: str | Path):
    """The supernet training as a trials-engine job (a Ray Tune trial): its folder holds the checkpoint,
    the snapshots and `result.json`."""
    from archlab.trials import Job

    out = Path(out).resolve()
    options = {k: getattr(settings, k) for k in ("rule", "random_subnets", "distill", "distill_weight", "snapshot_every")}
    return Job(key="supernet", arch={"space": settings.space, "space_path": settings.space_path}, data=settings.data,
               train=settings.train, result=str(out / "result.json"), workdir=str(out), task="supernet",
               options=options, meta={"proxy": settings.proxy})


def run_job(job, data, t, on_report) -> dict:
    """The trials engine's entry for a supernet job."""
    settings = SupernetSettings(space=job.arch["space"], space_path=job.arch.get("space_path", ""), data=job.data,
                                train=asdict(t), **job.options)
    return train_supernet(settings, data, job.workdir, on_report=on_report)


def run(settings: SupernetSettings, out: str | Path, on_event=None) -> dict | None:
    """Train the supernet in `out` as a Ray Tune trial, resuming what the folder holds; returns its
    result, or None when it stopped before finishing. One run at a time holds the folder. `on_event`:
    the trials engine's progress events."""
    from archlab.io import folder_lock
    from archlab.trials import read, tune_jobs

    with folder_lock(out):
        open_folder(settings, out)
        the_job = job(settings, out)
        if read(the_job.result) is None:
            tune_jobs(settings, out, "supernet", jobs=[the_job], on_event=on_event)
        return read(the_job.result)


def open_folder(settings: SupernetSettings, out: str | Path) -> None:
    """Write `supernet.json` in a new folder; in a folder that has one, refuse other settings (the step
    count and the bookkeeping may change: a longer run continues from the checkpoint)."""
    out = Path(out)
    path = out / SETTINGS
    if path.is_file():
        theirs = read_settings(out)
        if theirs.identity() != settings.identity():
            ours, old = settings.identity(), theirs.identity()
            diff = next(k for k in ours if ours[k] != old[k])
            raise ArchlabError(f"--out: {out} holds a supernet trained with another {diff}; pick another folder")
        result = out / "result.json"
        if result.is_file() and json.loads(result.read_text()).get("steps") != settings.train["steps"]:
            result.unlink()  # train on (or stop earlier): the checkpoint decides where it resumes
    write_atomic(path, json.dumps(asdict(settings), indent=1) + "\n")
