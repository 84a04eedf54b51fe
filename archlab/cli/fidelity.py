"""`archlab fidelity`: how well each proxy preset ranks a panel of designs against a long reference
training (Kendall tau, seed noise, cost); trains what is missing (resumable), then writes the report.
"""

from __future__ import annotations

import argparse
import json

from archlab.cli.common import TRIAL_FLAGS, batch_printer, data_config, dataset_args, folder, given, trial_args

# flags whose defaults are FidelitySettings' (archlab/fidelity.py); --presets is parsed in cmd_fidelity
SETTINGS_FLAGS = ("ladder", "space", "space_samples", "panel_seed", "reference", "default_preset", "seeds",
                  "reference_seeds", *TRIAL_FLAGS)


def add_parser(sub) -> None:
    fi = sub.add_parser("fidelity", help="proxy fidelity: rank a panel of designs with each proxy preset and with a long "
                                         "reference training; Kendall tau, noise, cost (resumable)")
    fi.add_argument("--ladder", help="ladder whose rows join the panel")
    fi.add_argument("--space", help="search space sampled for the panel")
    fi.add_argument("--space-samples", type=int, help="seeded samples of --space in the panel (default 8)")
    fi.add_argument("--panel-seed", type=int)
    fi.add_argument("--presets", help="presets compared, comma-separated (default smoke,cpu)")
    fi.add_argument("--reference", help="the long training ranked against (default reference)")
    fi.add_argument("--default-preset", help="the lab's default CPU preset (reported as such)")
    fi.add_argument("--seeds", type=int, help="seeds per preset and design (default 3)")
    fi.add_argument("--reference-seeds", type=int)
    fi.add_argument("--only", help="train only these presets now (e.g. --only reference on a GPU machine)")
    fi.add_argument("--no-train", action="store_true", help="train nothing: analyse the results there are")
    fi.add_argument("--results", type=folder, default="runs/fidelity/results",
                    help="folder of the trainings' result files (reports/proxy_fidelity/results holds the lab's)")
    fi.add_argument("--work", type=folder, default="runs/fidelity", help="checkpoints and Ray state")
    fi.add_argument("--out", type=folder, default="runs/fidelity/report", help="where to write proxy_fidelity.{md,json,png}")
    # 1 CPU per trial and 2 at once: fidelity's own defaults, not TrialSettings' (2 and 1)
    trial_args(fi, concurrency_help="trainings at once (default 2)", cpus_per_trial=1, concurrency=2, device=True,
               examples=False)
    dataset_args(fi, image_size=False)
    fi.add_argument("--json", action="store_true", help="print the analysis as JSON")
    fi.set_defaults(run=cmd_fidelity, resumes=True)


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _regenerating_command(argv: list[str]) -> str:
    """The command that regenerates the report: without the flags that only choose what to train now."""
    import shlex

    out, skip = [], False
    for a in argv:
        if skip or a == "--no-train" or a.startswith("--only="):
            skip = False
        elif a == "--only":
            skip = True
        else:
            out.append(a)
    return "archlab " + shlex.join(out)


def cmd_fidelity(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from archlab.fidelity import FidelitySettings, run, write_report

    presets = {} if args.presets is None else {"presets": _names(args.presets)}
    settings = FidelitySettings(data=asdict(data_config(args)),  # each preset sets its own resolution
                                train={"device": args.device}, **presets, **given(args, *SETTINGS_FLAGS))
    only = [] if args.no_train else (_names(args.only) if args.only else None)
    analysis = run(settings, args.results, args.work, only=only, on_event=batch_printer())
    paths = write_report(analysis, settings, args.out, _regenerating_command(args.argv))
    if args.json:
        print(json.dumps(analysis, indent=2))
        return 0
    d = analysis["presets"][settings.default_preset]["scores"]["val_loss"]
    print(f"{len(analysis['designs'])} designs; {len(analysis['missing'])} trainings not finished")
    for name, e in analysis["presets"].items():
        taus = ", ".join(f"{k} tau {v['kendall_tau']:.2f}" for k, v in e["scores"].items() if v.get("kendall_tau") is not None)
        cost = e["cpu_minutes_per_design"]
        print(f"  {name}: {'%.1f CPU-min per training' % cost if cost is not None else 'no CPU runs'}"
              f"{'; ' + taus if taus else ''}")
    if d.get("kendall_tau") is not None:
        print(f"default preset {settings.default_preset}: val loss Kendall tau {d['kendall_tau']:.2f} vs the reference")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if not analysis["missing"] else 1
