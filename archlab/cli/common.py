"""What the command groups share: the parser with one-line errors, argument types, the data, training
and trial flags (and the configs made from them), and the printers of tables and trial progress.

Imports nothing heavy (torch, ray, optuna, onnxruntime): the parser is built on every start. A flag
that sets a settings dataclass's field takes its default from that field: `defaults` reads it where
the dataclass's module is light (TrainConfig, the latency Protocol); where it is not (the search,
ablation, fidelity and trial settings) the flag defaults to None and `given` passes on only the
flags the user set.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

# the flags of `TrialSettings` (archlab/cluster.py): where a command's Ray trials run
TRIAL_FLAGS = ("cpus_per_trial", "gpus_per_trial", "concurrency", "retries", "address")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- argument types -----------------------------------------------------------------------------

def folder(path: str) -> str:
    """An output folder: new, or an existing folder (never an existing file)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def out_file(path: str) -> str:
    """An output file: new, or an existing file (never a folder)."""
    if Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    return path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def file_name(name: str) -> str:
    """A file-name stem: letters, digits, `_`, `-` and `.` only (no folders)."""
    if not name or not all(c.isalnum() or c in "_-." for c in name) or name.startswith("."):
        raise argparse.ArgumentTypeError(f"{name!r} is not a file name (letters, digits, _ - .)")
    return name


def defaults(cls: type) -> dict[str, Any]:
    """The default of each field of a dataclass, for the flags that set them (only a dataclass whose
    module is light to import: the parser is built on every start)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags among `names` (settings field names) that the user gave; the others are left to the
    settings dataclass's defaults (their flags default to None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


# ---- shared flags -------------------------------------------------------------------------------

def dataset_args(p: argparse.ArgumentParser, image_size: bool = True) -> None:
    p.add_argument("--dataset", default="synthetic",
                   help="`synthetic` (embedded default), an ImageNet-style folder, or a prepared .pt set")
    if image_size:
        p.add_argument("--image-size", type=int, help="proxy resolution in pixels (default: the --proxy preset's)")
    p.add_argument("--classes", type=int, help="use the first N classes")
    p.add_argument("--per-class", type=int, help="train images per class")
    p.add_argument("--val-per-class", type=int, help="validation images per class")


def train_args(p: argparse.ArgumentParser, threads: bool = False) -> None:
    """--proxy and a flag per preset setting (TrainConfig's fields), then the run's own settings."""
    from archlab.presets import DEFAULT, presets
    from archlab.train_config import TrainConfig, preset_settings

    p.add_argument("--proxy", metavar="PRESET",
                   help=f"proxy preset: {', '.join(presets())} (default {DEFAULT}; reports/proxy_fidelity.md has "
                        "their measured fidelity), or FILE.yaml:NAME; the flags below override its values")

    for name, s in preset_settings().items():
        p.add_argument("--" + name.replace("_", "-"), type=s["type"], choices=s["choices"] or None,
                       help=f"{s['help']} (default: the preset's)")
    train = defaults(TrainConfig)
    p.add_argument("--seed", type=int, default=train["seed"], help=f"training seed (default {train['seed']})")
    p.add_argument("--device", default=train["device"], help="torch device (cpu, cuda, ...)")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",  # None: TrainConfig's
                   help="steps between a training's checkpoints, where a stopped run resumes "
                        f"(default {train['checkpoint_every']})")
    if threads:  # search and ablate: a trial's threads are its --cpus-per-trial
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: these proxies gain little from more, and on a busy 2-core "
                            "machine 2 threads ran up to 10x slower)")


def trial_args(p: argparse.ArgumentParser, concurrency_help: str | None, cpus_per_trial: int | None = None,
               concurrency: int | None = None, device: bool = False, examples: bool = True) -> None:
    """--cpus-per-trial, --gpus-per-trial, --concurrency, --retries and --address (TRIAL_FLAGS): a default left None
    is TrialSettings'. No --concurrency where `concurrency_help` is None (a command of one trial).
    `device` adds the trials' --device before --address (for a command without `train_args`);
    `examples` ends the GPU and address help with examples."""
    from archlab.train_config import TrainConfig

    p.add_argument("--cpus-per-trial", type=int, default=cpus_per_trial)
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial (with --device cuda" + ("; fractions share one)" if examples else ")"))
    if concurrency_help is not None:
        p.add_argument("--concurrency", type=int, default=concurrency, help=concurrency_help)
    if device:
        p.add_argument("--device", default=defaults(TrainConfig)["device"], help="torch device of every training")
    p.add_argument("--retries", type=int, help="restarts of a trial whose process or node is lost, each from its last "
                                               "checkpoint (default 2); a training that raises is not retried")
    p.add_argument("--address", help="attach to a running Ray cluster" + (" (e.g. auto or HOST:6379)" if examples else ""))


def export_jobs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export-jobs", type=positive_int, default=1, metavar="N",
                   help="at most N whole networks exported at once, each in its own process (default 1; exporting "
                        "is mostly single-threaded, but holds several copies of a network's weights: a network "
                        "starts beside others only while their estimated peaks fit in 90%% of the memory available)")


# ---- configs from the flags ---------------------------------------------------------------------

def preset(args: argparse.Namespace):
    from archlab import presets

    return presets.get(getattr(args, "proxy", None))


def data_config(args: argparse.Namespace):
    from archlab.data import DataConfig

    size = getattr(args, "image_size", None) or preset(args).image_size
    return DataConfig(args.dataset, size, args.classes, args.per_class, args.val_per_class)


def train_config(args: argparse.Namespace, threads: int):
    """The --proxy preset's training, with every flag the user gave on top."""
    from archlab.train_config import preset_settings

    over = {name: getattr(args, name) for name in preset_settings()}
    return preset(args).train_config(**over, seed=args.seed, device=args.device, threads=threads,
                                     checkpoint_every=args.checkpoint_every)


# ---- printing -----------------------------------------------------------------------------------

def table(rows: list[Sequence[str]], header: Sequence[str], align: str) -> str:
    """Columns padded to their widest cell; `align` has an `l` or `r` per column."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def fmt(cells: Sequence[Any]) -> str:
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def _minutes(result: dict | None) -> str:
    if not result:
        return ""
    return f"{((result.get('seconds') or 0) + (result.get('score_seconds') or 0)) / 60:.1f} min"


def _scores(result: dict) -> str:
    return ", ".join(f"{k} {result[k]:.4g}" for k in ("val_loss", "fid", "kid") if result.get(k) is not None)


def job_printer(label=lambda info: info["job"]):
    """One line per trial event on stderr, instead of Ray's repeated status table."""
    def on_event(kind: str, info: dict) -> None:
        r = info.get("result") or {}
        what = label(info)
        line = {"start": f"{what}: started",
                "scoring": f"{what}: trained {r.get('steps')} steps; scoring (validation loss"
                           + (f", {r['samples']} samples for FID/KID)" if r.get("samples") else ")"),
                "done": f"{what}: {r.get('status')} {_scores(r)} ({_minutes(r)}){' ' + r.get('reason', '') if r.get('status') != 'ok' else ''}",
                "stopped": f"{what}: stopped early (ASHA)",
                "error": f"{what}: failed: {r.get('reason', '')}",
                "retry": f"{what}: its process was lost ({r.get('reason', '')}); restarting it from its last checkpoint "
                         f"(retry {r.get('attempt')} of {r.get('of')})"}.get(kind)
        if line:
            print(line, file=sys.stderr, flush=True)
    return on_event


def batch_printer():
    """Progress lines for a batch of jobs (ablate, fidelity): the trials engine's (kind, job, info)."""
    printer = job_printer()
    return lambda kind, job, info: printer(kind, {"job": job.key, **job.meta, "result": info})
