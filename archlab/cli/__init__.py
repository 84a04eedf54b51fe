"""The `archlab` command: parses, calls library functions, prints. Bad input: one line, exit 2.

One module per command group, each with `add_parser(sub)` (its subcommands and their `cmd_*`
functions); `common` holds the flags and printers they share. A new group is one more module in
COMMANDS, whose order is the order of `archlab --help`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from typing import Sequence

from archlab.cli import ablate, cost, data, fidelity, latency, report, search, supernet, train
from archlab.cli.common import Parser
from archlab.errors import ArchlabError

COMMANDS = (cost, train, search, ablate, fidelity, report, data, latency, supernet)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="archlab", description="Architecture search and ablation lab for small, fast diffusion backbones (UNet and DiT).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.add_parser(sub)
    return p


_TERMINATED: list[int] = []  # SIGTERM came (libraries in between may re-raise a plain KeyboardInterrupt)


def _terminate(signum, frame):
    """SIGTERM (`kill PID`, a scheduler's stop): handled as Ctrl-C is, exit status 143."""
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except ArchlabError as e:
        print(f"archlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a run folder is left as it resumes
        how = getattr(args, "resume_command", None)
        if how is None and getattr(args, "resumes", False):
            how = shlex.join(["archlab", *args.argv])  # re-running the same command resumes
        print(f"archlab: interrupted{'; continue with: ' + how if how else ''}", file=sys.stderr)
        return 143 if _TERMINATED else 130
    except BrokenPipeError:  # e.g. `archlab ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
