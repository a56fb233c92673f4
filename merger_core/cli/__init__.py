"""The ``model-merger`` command line. Each subcommand lives in its own module in this package.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Add the module's
name to ``COMMANDS`` to make it available.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from ..version import __version__
from ..errors import MergeCancelled, ModelMergerError
from ._signals import Signals, interrupted_message

COMMANDS = [
    "scan",
    "merge",
    "demo",
    "hash", "lookup",
    "train_diff", "cross_merge", "bases",
    "analyze", "diff", "lineage",
    "verify",
    "extract_lora", "merge_loras",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-merger",
        description="Merge Stable Diffusion checkpoints key by key, with bounded memory.",
    )
    parser.add_argument("--version", action="version", version=f"model-merger {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        mod = importlib.import_module(f".{name}", __name__)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with Signals() as sig:  # SIGINT, SIGTERM, SIGHUP: see _signals.py
        args._signals = sig
        try:
            return int(args._run(args) or 0)
        except KeyboardInterrupt:
            print(f"\n{interrupted_message(sig)}", file=sys.stderr)
            return sig.exit_code
        except MergeCancelled as exc:
            print(f"\n{interrupted_message(sig)}" if sig.signum is not None else f"error: {exc}", file=sys.stderr)
            return sig.exit_code
        except ModelMergerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2


def entry() -> int:
    """The console command: commands that write a model file run under a supervisor (see ``_supervise.py``)."""
    from ._supervise import run_supervised, wants_supervisor

    argv = sys.argv[1:]
    return run_supervised(argv, build_parser) if wants_supervisor(argv) else main(argv)


if __name__ == "__main__":
    sys.exit(entry())
