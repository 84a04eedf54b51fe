"""Does proxy training learn? A trained proxy against the same model untrained, on real images.

Two steps, so the training can run on a GPU box and the scoring with the standard FID network here:

    # 1. train (and keep the generated images): an untrained copy (0 steps) and a trained one
    python benchmarks/proxy_quality.py train --dataset DATA --steps 4000 --batch 128 --device cuda --out runs/proxy-quality
    # 2. score both sets of images with each extractor against the validation set, write the report
    python benchmarks/proxy_quality.py report --dataset DATA --dir runs/proxy-quality --out reports/proxy_quality

DATA is an ImageNet-style folder or a prepared set (`archlab data --dataset FOLDER ... --export F.pt`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from archlab.io import write_atomic

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "search_spaces" / "snapgen_ablation.yaml"


def _data(args):
    from archlab.data import DataConfig, load_dataset

    return load_dataset(DataConfig(args.dataset, args.image_size, args.classes, args.per_class, args.val_per_class))


def cmd_train(args) -> None:
    import torch

    from archlab.ladder import load_ladder
    from archlab.train import TrainConfig, train

    from dataclasses import asdict

    from archlab.train import NOT_TRAINING

    data = _data(args)
    arch = load_ladder(LADDER).row(args.row).config
    for name, steps in (("untrained", 0), ("trained", args.steps)):
        t = TrainConfig(steps=steps, batch=args.batch, lr=args.lr, width_mult=args.width, samples=args.samples,
                        sample_steps=args.sample_steps, cfg_scale=args.cfg_scale, fid_extractor="randconv",
                        val_images=args.val_images, device=args.device, checkpoint_every=200, seed=args.seed)
        done = Path(args.out) / name / "run.json"
        if done.is_file():  # finished earlier with the same settings and data: keep it
            old = json.loads((done.parent / "result.json").read_text())
            same = (old["steps"] == steps and old["settings"]["data"] == data.key and json.loads(done.read_text())["row"] == args.row
                    and old["settings"]["train"] == {k: v for k, v in asdict(t).items() if k not in NOT_TRAINING})
            if same:
                print(f"{name}: already done ({done.parent})")
                continue
            done.unlink()
        t0 = time.time()
        r = train(arch, data, t, out=Path(args.out) / name, progress=True)
        info = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                "torch": torch.__version__, "wall_s": time.time() - t0, "dataset": data.describe(), "row": args.row,
                "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale, "python": platform.python_version()}
        info["command"] = "python benchmarks/proxy_quality.py " + " ".join(sys.argv[1:])
        write_atomic(Path(args.out) / name / "run.json", json.dumps(info, indent=1) + "\n")
        print(f"{name}: {r.status} {r.reason} val_loss={r.val_loss} fid[randconv]={r.fid} in {info['wall_s']:.0f}s", flush=True)


def cmd_report(args) -> None:
    import torch

    from archlab.train import score_images

    data = _data(args)
    runs = {}
    for name in ("untrained", "trained"):
        d = Path(args.dir) / name
        result = json.loads((d / "result.json").read_text())
        if result["settings"]["data"] != data.key:
            sys.exit(f"{d}: trained on {result['settings']['data']}, but --dataset gives {data.key}")
        info = json.loads((d / "run.json").read_text())
        fake = torch.load(d / "samples.pt")
        scores = {ext: score_images(fake, data, ext) for ext in args.extractors}
        val = result.get("val") or {"images": 1000, "selection": "the first images of the class-ordered validation set "
                                                             "(half of the classes; the trainer then took a prefix)"}
        runs[name] = {"result": {k: result[k] for k in ("status", "steps", "seconds", "val_loss", "train_loss", "params")},
                      "val": val,
                      "scores": scores, "samples": len(fake), "run": info}
        print(name, {e: round(s["fid"], 2) for e, s in scores.items()}, flush=True)
    n = runs["trained"]["samples"]  # reference points with as many images as the models were scored on
    g = torch.Generator().manual_seed(0)
    refs = {"real training images": data.train[torch.randperm(len(data.train), generator=g)[:n]],
            "uniform noise": torch.randint(0, 256, (n, *data.train.shape[1:]), generator=g, dtype=torch.uint8)}
    references = {name: {ext: score_images(x, data, ext) for ext in args.extractors} for name, x in refs.items()}
    t = json.loads((Path(args.dir) / "trained" / "result.json").read_text())["settings"]["train"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"runs": runs, "references": references, "train_settings": t, "dataset": data.describe(), "row": runs["trained"]["run"]["row"],
              "commands": [runs["trained"]["run"].get("command", ""), "python benchmarks/proxy_quality.py " + " ".join(sys.argv[1:])]}
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    u, tr = runs["untrained"], runs["trained"]
    info = tr["run"]
    lines = ["# Proxy training learns: trained vs untrained on real images", "",
             f"Design: ladder row `{report['row']}` at proxy scale (width x{t['width_mult']}, "
             f"{data.resolution}x{data.resolution} pixels, {tr['result']['params']:,} params). Data: "
             f"`{data.source}`, {data.num_classes} classes, {len(data.train)} training and {len(data.val)} validation "
             "images. Trained on " + (f"{info['gpu']}" if info.get("gpu") else info["device"]) +
             f" (torch {info['torch']}): {t['batch']} images/step, {tr['result']['steps']} steps, lr {t['lr']}, "
             f"logit-normal t, EMA {t['ema']}, label dropout {t['label_dropout']}, {tr['result']['seconds']:.0f} s. "
             f"{tr['samples']} images sampled per model (Euler, {info['sample_steps']} steps, CFG "
             f"{info['cfg_scale']}); FID/KID against the validation set; validation loss = flow-matching loss "
             f"at 8 fixed timesteps and fixed noise on {tr['val']['images']} validation images, "
             f"{tr['val']['selection']}.", "",
             "| model | val loss | " + " | ".join(f"FID [{e}] | KID [{e}]" for e in args.extractors) + " |",
             "|---|---:|" + "---:|---:|" * len(args.extractors)]
    for name, r in (("untrained (0 steps)", u), (f"trained ({tr['result']['steps']} steps)", tr)):
        cells = [f"{r['scores'][e]['fid']:.2f} | {r['scores'][e]['kid']:.4f} ± {r['scores'][e]['kid_std']:.4f}"
                 for e in args.extractors]
        lines.append(f"| {name} | {r['result']['val_loss']:.4f} | " + " | ".join(cells) + " |")
    for name, r in references.items():
        cells = [f"{r[e]['fid']:.2f} | {r[e]['kid']:.4f} ± {r[e]['kid_std']:.4f}" for e in args.extractors]
        lines.append(f"| reference: {n} {name} | | " + " | ".join(cells) + " |")
    names = {e: tr["scores"][e]["fid_extractor"] for e in args.extractors}
    lines += ["", "Extractors: " + "; ".join(f"`{e}` = {n}" for e, n in names.items()) + ".", "",
              "![samples of the trained model](proxy_quality_samples.png)", "",
              "Regenerate (training ran with the first command, scoring here with the second):", "",
              *[f"    {c}" for c in report["commands"] if c], ""]
    write_atomic(out.with_suffix(".md"), "\n".join(lines))
    png = Path(args.dir) / "trained" / "samples.png"
    if png.is_file():
        (out.parent / "proxy_quality_samples.png").write_bytes(png.read_bytes())
    print(f"wrote {out.with_suffix('.md')}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "report"):
        s = sub.add_parser(name)
        s.add_argument("--dataset", required=True)
        s.add_argument("--image-size", type=int, default=32)
        s.add_argument("--classes", type=int)
        s.add_argument("--per-class", type=int)
        s.add_argument("--val-per-class", type=int)
    t = sub.choices["train"]
    t.add_argument("--row", default="qknorm-rope", help="ladder row (default: the final design)")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--width", type=float, default=0.125)
    t.add_argument("--samples", type=int, default=2000)
    t.add_argument("--sample-steps", type=int, default=20)
    t.add_argument("--cfg-scale", type=float, default=2.0)
    t.add_argument("--val-images", type=int, default=1000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", default="runs/proxy-quality")
    r = sub.choices["report"]
    r.add_argument("--dir", default="runs/proxy-quality")
    r.add_argument("--extractors", nargs="+", default=["inception", "randconv"])
    r.add_argument("--out", default="reports/proxy_quality")
    args = p.parse_args()
    if args.cmd == "train":
        cmd_train(args)
    else:
        cmd_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
