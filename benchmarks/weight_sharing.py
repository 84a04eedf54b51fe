"""Weight-sharing fidelity: does a supernet's inherited validation loss rank designs like long training?

On the proxy-fidelity panel (`archlab fidelity`'s 16 designs: the ablation ladder's rows and 8 seeded
samples of the UNet space), each design is scored with the weights it inherits from one or more trained
supernets (`archlab supernet train`), at every snapshot the supernet kept and with a number of held-out
images each; optionally also after `--finetune N` steps of standalone training from the inherited
weights. Every score is ranked against the panel's `reference` trainings (the committed results of
`archlab fidelity`, mean over their seeds): Kendall tau with a bootstrap interval over designs, beside
the `cpu` preset's tau from the same results. Two supernets of different seeds are also ranked against
each other (the supernet's own seed noise). Scores are cached in `reports/weight_sharing/scores.json`
(keyed by supernet, step, images and fine-tuning), so the report regenerates without scoring again.

    python benchmarks/weight_sharing.py --supernet runs/supernet-unet-s0 [--supernet runs/supernet-unet-s1] \\
        --finetune 50 --out reports

Time it alone: the seconds per candidate become the report's candidates-per-CPU-hour figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archlab.io import write_atomic  # noqa: E402

SEARCH_CANDIDATES = 1000  # the supernet's training amortised over a search of this many candidates


def panel_designs(args):
    from archlab.fidelity import panel

    return panel(args.ladder, args.space, args.space_samples, args.panel_seed)


def preset_means(results: Path, names: list[str], preset: str) -> tuple[dict[str, float], list[float]]:
    """Each design's val loss averaged over the preset's seeds that every design has, and the trainings'
    CPU-minutes."""
    from archlab.fidelity import cpu_minutes

    runs = {n: {} for n in names}
    for n in names:
        for f in (results / n).glob(f"{preset}-seed*.json"):
            r = json.loads(f.read_text())
            if r.get("status") == "ok":
                runs[n][r["seed"]] = r
    common = set.intersection(*(set(r) for r in runs.values()))
    if not common:
        raise SystemExit(f"{results}: no {preset} seed that every panel design has")
    minutes = [m for r in runs.values() for k in common if (m := cpu_minutes(r[k])) is not None]
    return {n: statistics.mean(runs[n][k]["val_loss"] for k in common) for n in names}, minutes


def score_key(folder: Path, step: int | None, images: int, finetune: int) -> str:
    return f"{folder.name}|step={step}|images={images}|finetune={finetune}"


def score_all(sn, designs, images: int, finetune: int, cache: dict, key: str, save) -> dict:
    """{design: {val_loss, seconds}} for every panel design, cached under `key`."""
    from archlab.config import arch_from_dict

    done = cache.setdefault(key, {})
    for i, d in enumerate(designs):
        if d.name in done:
            continue
        cfg = arch_from_dict(d.config)
        done[d.name] = sn.finetune(cfg, finetune, images) if finetune else sn.score(cfg, images)
        done[d.name].pop("val_loss_t", None)
        done[d.name]["threads"] = sn.train.threads or 1
        print(f"{key}: {i + 1}/{len(designs)} {d.name} val_loss {done[d.name]['val_loss']:.4f} "
              f"({done[d.name]['seconds']:.1f} s)", file=sys.stderr, flush=True)
        save()
    return done


def time_scores(sn, designs, images: int) -> dict:
    """Seconds to score each panel design with inherited weights (extraction included), timed now: run alone."""
    import platform

    from archlab.config import arch_from_dict
    from archlab.latency.table import cpu_model

    seconds = [sn.score(arch_from_dict(d.config), images)["seconds"] for d in designs]
    return {"images": images, "threads": sn.train.threads or 1, "median_seconds": statistics.median(seconds),
            "seconds": seconds, "host": f"{cpu_model()} ({platform.node()})"}


def analyse(args) -> dict:
    from archlab.stats import kendall, rank_agreement
    from archlab.supernet import Supernet

    designs = panel_designs(args)
    names = [d.name for d in designs]
    ref, _ = preset_means(Path(args.results), names, args.reference)
    cpu, cpu_minutes = preset_means(Path(args.results), names, "cpu")
    cache_path = Path(args.out) / "weight_sharing" / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def save():
        write_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")

    def versus_reference(scores: dict) -> dict:
        ours = [scores[n]["val_loss"] for n in names]
        return {**rank_agreement(ours, [ref[n] for n in names], boot=args.boot),
                "kendall_tau_vs_cpu_preset": kendall(ours, [cpu[n] for n in names])}

    out = {"command": " ".join(["python", "benchmarks/weight_sharing.py", *sys.argv[1:]]), "designs": names,
           "training_shared_the_machine": args.training_shared,
           "reference": args.reference, "cpu_preset": rank_agreement([cpu[n] for n in names], [ref[n] for n in names],
                                                                      boot=args.boot),
           "cpu_minutes_per_training": statistics.median(cpu_minutes), "supernets": []}
    for folder in map(Path, args.supernet):
        done = (folder / "result.json").is_file()  # still training: score the snapshots it has kept
        result = json.loads((folder / "result.json").read_text()) if done else None
        steps = sorted(int(p.stem.split("-")[1]) for p in (folder / "snapshots").glob("ema-*.pt"))
        entry = {"folder": str(folder), "seed": None, "steps": result["steps"] if done else None,
                 "hardware": result.get("hardware") if done else None, "threads": None, "lengths": []}
        for step in [k for k in steps if not done or k != result["steps"]] + ([None] if done else []):
            sn = Supernet(folder, step=step, threads=args.threads)
            entry["seed"], entry["threads"] = sn.train.seed, sn.settings.train.get("threads") or 1
            length = {"step": sn.step, "cpu_minutes": sn.seconds * entry["threads"] / 60 if sn.seconds is not None
                      else (result["seconds"] * sn.step / result["steps"] * entry["threads"] / 60 if done else None),
                      "by_images": {}}
            for images in args.images:
                scores = score_all(sn, designs, images, 0, cache, score_key(folder, sn.step, images, 0), save)
                length["by_images"][images] = versus_reference(scores)
            entry["lengths"].append(length)
        if args.finetune and done and folder == Path(args.supernet[0]):  # fine-tuned: the first supernet
            images = max(args.images)
            scores = score_all(sn, designs, images, args.finetune, cache, score_key(folder, sn.step, images, args.finetune),
                               save)
            entry["finetune"] = {"steps": args.finetune, "images": images, **versus_reference(scores),
                                 "median_cpu_seconds": statistics.median(s["seconds"] * s.get("threads", 1)
                                                                         for s in scores.values())}
        if done:
            if args.timing and folder == Path(args.supernet[0]):
                out["timing"] = time_scores(sn, designs, min(args.images))
        out["supernets"].append(entry)
    if len(args.supernet) >= 2:  # the supernet's own seed noise, at the longest length both have
        a, b = map(Path, args.supernet[:2])
        steps = [e["step"] for e in out["supernets"][0]["lengths"]], [e["step"] for e in out["supernets"][1]["lengths"]]
        common = max(set(steps[0]) & set(steps[1]), default=None)
        if common is not None:
            sa, sb = (cache[score_key(f, common, max(args.images), 0)] for f in (a, b))
            out["seed_noise"] = {"supernets": [str(a), str(b)], "step": common, "images": max(args.images),
                                 **rank_agreement([sa[n]["val_loss"] for n in names], [sb[n]["val_loss"] for n in names],
                                                  boot=args.boot)}
    first = out["supernets"][0]
    if "timing" in out:  # candidates per CPU-hour, from scores timed alone (--timing)
        per_candidate = out["timing"]["median_seconds"] * out["timing"]["threads"]  # CPU-seconds
        amortised = per_candidate + first["lengths"][-1]["cpu_minutes"] * 60 / SEARCH_CANDIDATES
        trained = out["cpu_minutes_per_training"] * 60
        out["throughput"] = {"images": out["timing"]["images"], "cpu_seconds_per_candidate": per_candidate,
                             "candidates_per_cpu_hour": 3600 / per_candidate, "amortised_over": SEARCH_CANDIDATES,
                             "amortised_candidates_per_cpu_hour": 3600 / amortised,
                             "train_candidates_per_cpu_hour": 3600 / trained,
                             "candidates_per_cpu_hour_ratio": trained / amortised}
        out["candidates_per_cpu_hour_ratio"] = out["throughput"]["candidates_per_cpu_hour_ratio"]
    final = first["lengths"][-1]["by_images"][max(args.images)]
    out["kendall_tau"], out["kendall_tau_ci"] = final["kendall_tau"], final["kendall_tau_ci"]
    out["cpu_preset_kendall_tau"] = out["cpu_preset"]["kendall_tau"]
    return out


def _tau(r: dict) -> str:
    ci = r.get("kendall_tau_ci")
    return f"{r['kendall_tau']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r['kendall_tau']:.2f}"


def render(r: dict) -> str:
    """The report's Markdown: tables of the measured numbers; their meaning is in docs/weight-sharing.md."""
    lines = ["# Weight sharing: inherited validation loss against long training", "",
             f"Command: `{r['command']}`", "",
             "What the numbers mean and how they were made: `docs/weight-sharing.md`.", "",
             f"Panel: {len(r['designs'])} designs ({', '.join(r['designs'])}), ranked against the `{r['reference']}` "
             "trainings' validation loss (mean over their seeds).", "",
             "| evaluator | CPU-minutes | held-out images | Kendall tau vs reference [95% CI] | tau vs `cpu` preset |",
             "|---|---|---|---|---|",
             f"| `cpu` preset, each design trained (mean of its seeds) | {r['cpu_minutes_per_training']:.1f} per design | "
             f"500 | {_tau(r['cpu_preset'])} | 1 |"]
    for s in r["supernets"]:
        for length in s["lengths"]:
            for images, v in length["by_images"].items():
                minutes = "not yet" if length["cpu_minutes"] is None else f"{length['cpu_minutes']:.0f} once"
                lines.append(f"| supernet `{Path(s['folder']).name}` (seed {s['seed']}), {length['step']} steps | "
                             f"{minutes} | {images} | {_tau(v)} | {v['kendall_tau_vs_cpu_preset']:.2f} |")
        if "finetune" in s:
            f = s["finetune"]
            lines.append(f"| the same, each design fine-tuned {f['steps']} steps from its inherited weights | "
                         f"{f['median_cpu_seconds'] / 60:.1f} per design | {f['images']} | {_tau(f)} | "
                         f"{f['kendall_tau_vs_cpu_preset']:.2f} |")
    hosts = ", ".join(sorted({s["hardware"] or "not recorded" for s in r["supernets"]}))
    lines += ["", f"Supernet CPU-minutes: training wall time x threads as its folder records it, on {hosts}"
                  + ("; these trainings shared the machine with other work, so they are upper bounds."
                     if r["training_shared_the_machine"] else ", measured alone.")]
    if "seed_noise" in r:
        n = r["seed_noise"]
        lines += ["", f"Two supernet seeds against each other ({n['step']} steps, {n['images']} images): Kendall tau "
                      f"{_tau(n)}."]
    if "throughput" not in r:
        return "\n".join(lines + ["", "Candidates per CPU-hour: not yet (run with --timing, alone).", ""])
    t = r["throughput"]
    lines += ["", f"Scoring timed alone on {r['timing']['host']}, {r['timing']['threads']} thread(s).", "",
              "| candidates per CPU-hour | supernet | `cpu` preset training |", "|---|---|---|",
              f"| scoring only ({t['images']} images, {t['cpu_seconds_per_candidate']:.1f} CPU-s a candidate) | "
              f"{t['candidates_per_cpu_hour']:.0f} | {t['train_candidates_per_cpu_hour']:.1f} |",
              f"| with the supernet's training amortised over {t['amortised_over']} candidates | "
              f"{t['amortised_candidates_per_cpu_hour']:.0f} | {t['train_candidates_per_cpu_hour']:.1f} |", "",
              f"Ratio (amortised): {t['candidates_per_cpu_hour_ratio']:.0f}x.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--supernet", action="append", required=True, help="a trained supernet folder (repeat for seeds)")
    p.add_argument("--results", default="reports/proxy_fidelity/results", help="the fidelity panel's results")
    p.add_argument("--reference", default="reference")
    p.add_argument("--ladder", default="search_spaces/snapgen_ablation.yaml")
    p.add_argument("--space", default="search_spaces/snapgen_unet.yaml")
    p.add_argument("--space-samples", type=int, default=8)
    p.add_argument("--panel-seed", type=int, default=0)
    p.add_argument("--images", default="128,500", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--finetune", type=int, default=0, help="also fine-tune each design N steps (final weights)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while scoring")
    p.add_argument("--timing", action="store_true", help="also time the scoring of the panel (run alone)")
    p.add_argument("--training-shared", action="store_true",
                   help="say that the supernets were trained beside other work (their minutes are upper bounds)")
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--out", default="reports")
    args = p.parse_args()
    r = analyse(args)
    out = Path(args.out)
    write_atomic(out / "weight_sharing.json", json.dumps(r, indent=1, default=str) + "\n")
    write_atomic(out / "weight_sharing.md", render(r))
    print(render(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
