"""Search benchmark: TPE against random sampling, several seeds each, judged at reference scale.

For each sampler and seed, runs `archlab search` (same space, latency budget, proxy preset, data and
number of trials; resuming a run folder that already exists), then trains each search's best design
once more with the `reference` preset (8x the cpu preset's compute; a seed no search trial used) as
a trials-engine job, so every search is judged by the quality its pick reaches in a long training,
not by the proxy score that picked it. Writes `reports/search-benchmark/`: per search its
trials.csv, Pareto plot and summary; `reference/` (the reference trainings' results, committed so a
later run only adds what is missing); and a comparison (`summary.md`, `summary.json`,
`comparison.png`) with the difference between the samplers and its 95% interval over seeds.

    python benchmarks/search_benchmark.py --dataset ../shared/data/tiny-imagenet-100

With `--evaluator supernet --supernet DIR` the searches score candidates with inherited weights
(`archlab search --evaluator supernet`, hundreds per search) and their picks are judged the same way:

    python benchmarks/search_benchmark.py --dataset ../shared/data/tiny-imagenet-100 --evaluator supernet \
        --supernet runs/supernet-unet-s0 --trials 300 --retrain 3 --report reports/search-benchmark-supernet
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("tpe", "random")
REFERENCE_SEED = 2000  # the reference retraining's seed: no search trial trains with it


def search_argv(args, sampler: str, seed: int, run_dir: Path) -> list[str]:
    inherited = ["--evaluator", "supernet", "--supernet", args.supernet, "--eval-images", str(args.eval_images),
                 "--retrain", str(args.retrain)] if args.evaluator == "supernet" else []
    return ["--space", args.space, "--table", args.table, "--budget-ms", str(args.budget_ms), "--trials", str(args.trials),
            "--sampler", sampler, "--seed", str(seed), "--dataset", args.dataset, "--proxy", args.proxy,
            "--val-per-class", str(args.val_per_class), "--cpus-per-trial", str(args.cpus_per_trial),
            "--concurrency", str(args.concurrency), *inherited, "--out", str(run_dir)]


KEPT = ("trials.csv", "pareto.png", "summary.md", "summary.json")  # a finished search's outputs, committed


def run_search(args, sampler: str, seed: int) -> Path:
    """Run (or resume) one search, then keep its outputs and best config in the report folder: a search
    whose outputs are there is finished, and is not run again (a later session picks up the rest)."""
    from archlab.io import atomic_path

    dest = Path(args.report) / f"{sampler}-s{seed}"
    if (dest / "summary.json").is_file():
        return dest
    run_dir = Path(args.runs) / f"search-{sampler}-s{seed}"
    cli = [sys.executable, "-m", "archlab.cli", "search"]
    argv = cli + (["--resume", str(run_dir)] if (run_dir / "search.json").is_file() else
                  search_argv(args, sampler, seed, run_dir))
    print("$", shlex.join(argv), flush=True)
    subprocess.run(argv, check=True)
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in [(run_dir / "best" / "best-1.yaml", "best-1.yaml")] + [(run_dir / n, n) for n in KEPT]:
        if src.is_file():  # summary.json last: it marks the search as finished
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(src, tmp)
    return dest


def reference_jobs(args, runs: dict) -> dict:
    """One reference-preset training of each search's best design (a trials-engine job)."""
    import yaml

    from archlab import presets
    from archlab.data import DataConfig
    from archlab.trials import Job

    ref = presets.get(args.reference)
    data = asdict(DataConfig(str(Path(args.dataset).resolve()), ref.image_size, None, None, args.val_per_class))
    jobs = {}
    for (sampler, seed), run_dir in runs.items():
        best = run_dir / "best-1.yaml"
        if not best.is_file():
            continue
        jobs[sampler, seed] = Job(key=f"{sampler}-s{seed}", arch=yaml.safe_load(best.read_text()), data=data,
                                  train=asdict(ref.train_config(seed=REFERENCE_SEED)),
                                  result=str(Path(args.report) / "reference" / f"{sampler}-s{seed}.json"),
                                  workdir=str(Path(args.runs) / "reference" / f"{sampler}-s{seed}"),
                                  meta={"sampler": sampler, "search_seed": seed, "preset": ref.name,
                                        "best_config": str(best)})
    return jobs


def shared_candidates(tpe_dir: Path, random_dir: Path) -> int:
    """How many of the first candidates the two searches of one seed drew alike (TPE draws its first
    10 with a RandomSampler of the same seed, so its start is the random search's start)."""
    import pandas as pd

    a, b = (pd.read_csv(d / "trials.csv").sort_values("number") for d in (tpe_dir, random_dir))
    cols = [c for c in a.columns if c.startswith("param.")]
    n = 0
    for (_, x), (_, y) in zip(a[cols].iterrows(), b[cols].iterrows()):
        if not x.equals(y):
            break
        n += 1
    return n


def best_so_far(df, objective: str) -> list[float | None]:
    """Best objective among the trials trained so far, after each trial that was trained or stopped."""
    out, best = [], None
    for _, r in df[df["state"].isin(["COMPLETE", "PRUNED", "FAIL"])].sort_values("number").iterrows():
        if r["state"] == "COMPLETE" and (best is None or r[objective] < best):
            best = float(r[objective])
        out.append(best)
    return out


def report(args, runs: dict, refs: dict, command: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from archlab.io import atomic_path, write_atomic
    from archlab.stats import compare

    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"command": command, "objective": "val_loss", "budget_ms": args.budget_ms, "proxy": args.proxy,
               "evaluator": args.evaluator, "supernet": args.supernet, "retrain": args.retrain,
               "candidates_per_search": args.trials,
               "reference": args.reference, "trials": args.trials, "seeds": args.seeds, "searches": {}, "samplers": {}}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for (sampler, seed), run_dir in runs.items():
        s = json.loads((run_dir / "summary.json").read_text())
        df = pd.read_csv(run_dir / "trials.csv")
        trained = df[df["state"] == "COMPLETE"]
        curve = best_so_far(df, "val_loss")
        ref = refs.get((sampler, seed)) or {}
        summary["searches"][f"{sampler}-s{seed}"] = {
            "sampler": sampler, "seed": seed,
            **{k: s[k] for k in ("sampled", "rejected_over_budget", "trained", "stopped_early", "failed")},
            "best_val_loss": float(trained["val_loss"].min()) if len(trained) else None,
            "best_predicted_ms": float(trained.sort_values("val_loss")["predicted_ms"].iloc[0]) if len(trained) else None,
            "reference_val_loss": ref.get("val_loss") if ref.get("status") == "ok" else None,
            "reference_fid": ref.get("fid") if ref.get("status") == "ok" else None,
            "reference_status": ref.get("status", "missing"), "curve": curve}
        color = f"C{SAMPLERS.index(sampler)}"
        ax1.step(range(1, len(curve) + 1), [c if c is not None else float("nan") for c in curve], where="post",
                 color=color, alpha=0.7, label=sampler if seed == args.seeds[0] else None)
        ax2.scatter(trained["predicted_ms"], trained["val_loss"], s=12, color=color, alpha=0.5,
                    label=sampler if seed == args.seeds[0] else None)
    for sampler in SAMPLERS:
        rows = [v for v in summary["searches"].values() if v["sampler"] == sampler]
        summary["samplers"][sampler] = {
            key: [r[key] for r in rows] for key in ("seed", "best_val_loss", "reference_val_loss", "reference_fid",
                                                    "rejected_over_budget", "sampled")}
    seeds = sorted({seed for (_, seed) in runs if all((s, seed) in runs for s in SAMPLERS)})
    a, b = ({key: [summary["searches"][f"{s}-s{k}"][key] for k in seeds]
             for key in ("best_val_loss", "reference_val_loss", "reference_fid")} for s in SAMPLERS)
    summary["paired_seeds"] = seeds
    summary["shared_candidates"] = {k: shared_candidates(runs["tpe", k], runs["random", k]) for k in seeds}
    for key in ("best_val_loss", "reference_val_loss", "reference_fid"):
        c = compare(a[key], b[key])  # random - tpe, seed by seed: seed k is both searches' sampler and training seed
        summary[f"difference_{key}"] = {
            "random_minus_tpe": None if c.seeds == 0 else c.mean, "seeds": c.seeds,
            "ci95": [c.paired.low, c.paired.high] if c.paired else None,
            "ci95_unpaired": [c.unpaired.low, c.unpaired.high] if c.unpaired else None}
    ax1.set_xlabel("trials run (trained, stopped or failed)")
    ax1.set_ylabel("best proxy validation loss so far")
    ax2.axvline(args.budget_ms, color="k", ls="--", lw=0.8, label=f"budget {args.budget_ms:g} ms")
    ax2.set_xlabel("predicted latency (ms)")
    ax2.set_ylabel(f"proxy validation loss ({args.proxy})")
    for ax in (ax1, ax2):
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "comparison.png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_atomic(out / "summary.md", markdown(args, summary))
    return summary


def _f(v, fmt=".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _ci(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def markdown(args, summary: dict) -> str:
    rows = [f"| {v['sampler']} | {v['seed']} | {v['sampled']} | {v['rejected_over_budget']} | {v['trained']} | "
            f"{v['stopped_early']} | {v['failed']} | {_f(v['best_val_loss'])} | {_f(v['best_predicted_ms'], '.0f')} | "
            f"{_f(v['reference_val_loss'])} | {_f(v['reference_fid'], '.1f')} |" for v in summary["searches"].values()]
    diffs = []
    for key, label in (("best_val_loss", "best proxy val loss"), ("reference_val_loss", "reference val loss of the pick"),
                       ("reference_fid", "reference FID of the pick")):
        d = summary[f"difference_{key}"]
        ci = d["ci95"]
        verdict = "-" if ci is None else ("random is worse" if ci[0] > 0 else "TPE is worse" if ci[1] < 0 else
                                          "no difference outside the noise")
        diffs.append(f"| {label} | {d['seeds']} | {_f(d['random_minus_tpe'])} | {_ci(ci)} | "
                     f"{_ci(d['ci95_unpaired'])} | {verdict} |")
    pending = [f"{s}-s{k}" for k in args.seeds for s in SAMPLERS if f"{s}-s{k}" not in summary["searches"]]
    refs_pending = [k for k, v in summary["searches"].items() if v["reference_status"] != "ok"]
    status = []
    if pending or refs_pending:
        status = ["**In progress.** " + "; ".join(filter(None, [
            f"searches not finished yet: {', '.join(pending)}" if pending else "",
            f"reference trainings of the picks not run yet: {', '.join(refs_pending)}" if refs_pending else ""]))
            + ". The command below runs what is missing (finished searches and trainings are kept).", ""]
    shared = ", ".join(f"seed {k}: {n}" for k, n in summary["shared_candidates"].items()) or "-"
    return "\n".join([
        "# Search benchmark: TPE vs random sampling, judged at reference scale", "",
        f"Space `{args.space}`, latency budget {args.budget_ms:g} ms predicted on `{args.table}` (paper-width networks "
        f"at 32x32 latent on this CPU, 1 thread), {args.trials} trials per search (rejected candidates do not count), "
        f"seeds {', '.join(map(str, args.seeds))} per sampler, objective: validation loss after the `{args.proxy}` proxy "
        f"preset on `{Path(args.dataset).name}`, ASHA early stopping on the training loss. Each search's best design "
        f"is then trained once with the `{args.reference}` preset (8x the compute, a seed no trial used): that is the "
        "quality the search delivers.", "",
        *([f"Evaluator: the supernet `{args.supernet}`: every candidate within the budget scored by its inherited "
           f"validation loss on {args.eval_images} held-out images (the `best proxy val loss` columns), the best "
           f"{args.retrain} retrained with `{args.proxy}`; a search's pick is its best retrained design.", ""]
          if args.evaluator == "supernet" else []), *status,
        "Regenerate (resumes the run folders in `runs/bench/` and trains only the reference runs "
        "`reference/` lacks):", "", "```", summary["command"], "```", "",
        "| sampler | seed | sampled | rejected over budget | trained | stopped early (ASHA) | failed | best proxy val "
        "loss | its predicted ms | its reference val loss | its reference FID |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Random minus TPE over the seeds both samplers finished, with the paired 95% t interval (seed k is both "
        "searches' sampler seed and training seed: TPE draws its first 10 candidates with a RandomSampler of that "
        f"seed, so the two searches start alike; first candidates drawn alike, {shared}; and every trial of seed k "
        "trains on the same batches, timesteps and noise). The unpaired (Welch) interval is beside it; the verdict "
        "is the paired one's.", "",
        "| quantity | seeds | random - TPE | 95% interval (paired) | unpaired | verdict |", "|---|---|---|---|---|---|",
        *diffs, "",
        "![best-so-far and trials](comparison.png)", "",
        "Every trained trial is within the budget by prediction (the searcher rejects the others before training). "
        "Per search: `<sampler>-s<seed>/trials.csv` (every candidate: params, predicted latency, state, scores, "
        "durations), `pareto.png`, `summary.md`; `reference/<sampler>-s<seed>.json`: the reference training of its "
        "pick. TPE's first 10 trials are random (Optuna's default startup), so with few trials per search the two "
        "samplers differ mainly in how many candidates they draw over the budget.", ""])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--space", default="search_spaces/snapgen_unet.yaml")
    p.add_argument("--table", default="latency_tables/amd-epyc-2c.csv")
    p.add_argument("--budget-ms", type=float, default=900)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2", help="search seeds per sampler, comma-separated")
    p.add_argument("--proxy", default="cpu")
    p.add_argument("--reference", default="reference")
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--cpus-per-trial", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--evaluator", default="train", choices=("train", "supernet"))
    p.add_argument("--supernet", help="with --evaluator supernet: the trained supernet folder")
    p.add_argument("--eval-images", type=int, default=128)
    p.add_argument("--retrain", type=int, default=3, help="with --evaluator supernet: candidates retrained per search")
    p.add_argument("--runs", help="run folders (resumed if present; default runs/bench, with --evaluator supernet "
                                  "runs/bench-supernet)")
    p.add_argument("--report", default="reports/search-benchmark")
    p.add_argument("--report-only", action="store_true",
                   help="run and train nothing: write the comparison of the searches and reference trainings finished "
                        "so far (the rest are listed as in progress)")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.runs = args.runs or ("runs/bench-supernet" if args.evaluator == "supernet" else "runs/bench")
    if (args.evaluator == "supernet") != bool(args.supernet):
        p.error("--supernet DIR goes with --evaluator supernet")
    command = "python benchmarks/search_benchmark.py " + shlex.join(a for a in sys.argv[1:] if a != "--report-only")
    from archlab.cluster import TrialSettings
    from archlab.trials import read, run_jobs

    if args.report_only:  # the searches that finished, as they were kept
        runs = {(s, k): Path(args.report) / f"{s}-s{k}" for k in args.seeds for s in SAMPLERS
                if (Path(args.report) / f"{s}-s{k}" / "summary.json").is_file()}
    else:
        runs = {(s, k): run_search(args, s, k) for k in args.seeds for s in SAMPLERS}
    jobs = reference_jobs(args, runs)
    if args.report_only:
        results = [read(j.result) for j in jobs.values()]
    else:
        results = run_jobs(list(jobs.values()), TrialSettings(cpus_per_trial=args.cpus_per_trial,
                                                              concurrency=args.concurrency), Path(args.runs), "reference")
    summary = report(args, runs, dict(zip(jobs, results)), command)
    for key in ("best_val_loss", "reference_val_loss"):
        d = summary[f"difference_{key}"]
        print(f"{key}: random - tpe = {_f(d['random_minus_tpe'], '+.4f')}, paired 95% interval {d['ci95']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
