"""Training throughput: the lab's UNet against diffusers' UNet2DConditionModel, side by side.

Both are the ladder's baseline design (SDXL layout, standard convs, MHSA, GEGLU FFN x4) at the same
proxy scale, batch and resolution, with the same class-token conditioning and rectified-flow loss
and AdamW. Each measurement runs in a fresh subprocess (so peak memory is per model), and the two
models alternate for `--rounds` rounds; the report gives the median steps/s over rounds and the
ratio lab / diffusers. Needs `pip install diffusers` (the `bench` extra).

    python benchmarks/train_throughput.py --out reports/train_throughput   # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from archlab.io import write_atomic

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "search_spaces" / "snapgen_ablation.yaml"


def build(which: str, args):
    import torch

    from archlab.ladder import load_ladder
    from archlab.train import ProxyModel, TrainConfig, proxy_arch

    t = TrainConfig(width_mult=args.width, context_dim=64, context_len=4)
    arch = proxy_arch(load_ladder(LADDER).row(args.row).config, args.res, t)
    lab = ProxyModel(arch, 10)
    if which == "lab":
        return lab, arch
    from diffusers import UNet2DConditionModel

    c = [arch.channels(i) for i in range(arch.n_stages)]
    depth = [arch.stages[i].transformer_depth for i in range(arch.n_stages)]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth]
    unet = UNet2DConditionModel(
        sample_size=args.res, in_channels=3, out_channels=3, block_out_channels=tuple(c),
        down_block_types=tuple(down), up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        layers_per_block=arch.stages[0].res_blocks, transformer_layers_per_block=tuple(max(d, 1) for d in depth),
        attention_head_dim=tuple(arch.heads(i) for i in range(arch.n_stages)), cross_attention_dim=64,
        norm_num_groups=arch.norm_groups)
    # diffusers' mid block has transformer_layers_per_block[-1] transformers, as our mid_depth

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.classes, self.num_classes = unet, lab.classes, 10

        def forward(self, x, t, labels):
            ctx = self.classes(labels).view(len(labels), 4, 64)
            return self.unet(x, t * 1000, encoder_hidden_states=ctx).sample

    return Wrapped(), arch


def worker(which: str, args) -> dict:
    """Time `args.steps` training steps after `args.warmup` (in this fresh process)."""
    import resource

    import torch

    from archlab.train import flow_loss

    import archlab.train  # noqa: F401  (imports are not the model's memory)
    if which == "diffusers":
        import diffusers  # noqa: F401

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, _ = build(which, args)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.res, args.res, generator=g).to(device)
    eps = torch.randn(x.shape, generator=g).to(device)
    t = torch.rand(args.batch, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = flow_loss(model, x, y, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    return {"model": which, "params": sum(p.numel() for p in model.parameters()),
            "step_s_median": statistics.median(times), "steps_per_s": 1 / statistics.median(times), "peak_mib": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", default="baseline", help="ladder row (diffusers can express the SDXL-style baseline)")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="reports/train_throughput")
    p.add_argument("--worker", choices=("lab", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("row", "res", "width", "batch", "steps", "warmup", "threads", "device")]
    results: dict[str, list[dict]] = {"lab": [], "diffusers": []}
    for r in range(args.rounds):
        for which in ("lab", "diffusers"):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--worker", which], capture_output=True,
                                 text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{which} worker failed:\n{out.stderr[-3000:]}")
            results[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {which}: {results[which][-1]['steps_per_s']:.3f} steps/s", flush=True)
    summary = {}
    for which, rs in results.items():
        summary[which] = {"params": rs[0]["params"], "steps_per_s": statistics.median(x["steps_per_s"] for x in rs),
                          "steps_per_s_rounds": [x["steps_per_s"] for x in rs],
                          "peak_mib": statistics.median(x["peak_mib"] for x in rs)}
    # paired: each round ran both models back to back, so a round's ratio cancels the machine's drift
    round_ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(results["lab"], results["diffusers"])]
    ratio = statistics.median(round_ratios)
    import diffusers
    import torch

    report = {"ratio_lab_over_diffusers": ratio, "round_ratios": round_ratios, "models": summary,
              "setup": {k: getattr(args, k) for k in ("row", "res", "width", "batch", "steps", "warmup", "rounds",
                                                       "threads", "device")},
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "python": platform.python_version()},
              "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    lab, dif = summary["lab"], summary["diffusers"]
    md = ["# Training throughput: archlab UNet vs diffusers UNet2DConditionModel", "",
          f"Ladder row `{args.row}` at proxy scale (width x{args.width}, {args.res}x{args.res} pixels), batch "
          f"{args.batch}, {args.device} with {args.threads} thread(s); rectified-flow loss, backward and AdamW step. "
          f"Median over {args.rounds} alternating rounds of {args.steps} steps (after {args.warmup} warm-up), each in "
          "a fresh process.", "",
          "| model | params | steps/s | per round | peak memory MiB |", "|---|---:|---:|---|---:|",
          *[f"| {name} | {s['params']:,} | {s['steps_per_s']:.3f} | "
            f"{', '.join(f'{v:.3f}' for v in s['steps_per_s_rounds'])} | {s['peak_mib']:.0f} |"
            for name, s in (("archlab", lab), ("diffusers", dif))],
          "", f"**Ratio archlab / diffusers: {ratio:.2f}x** steps/s (median of the per-round ratios "
          f"{', '.join(f'{r:.3f}' for r in round_ratios)}). Both are the same network: equal parameter counts, "
          "the same blocks; the time goes to the same convolutions, matmuls and attention.", "",
          f"torch {torch.__version__}, diffusers {diffusers.__version__}. Regenerate:", "", f"    {report['command']}", ""]
    write_atomic(out.with_suffix(".md"), "\n".join(md))
    print(f"ratio {ratio:.3f}; wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
