"""The `mohico` command. Each subcommand lives in ``mohico/launcher/commands/<name>.py`` and
defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; heavy imports (torch,
DALI, DeepSpeed) happen inside ``run`` so ``--help`` stays fast.

Exit codes: 0 success, 1 runtime failure, 2 usage or config error.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mohico.errors import MohicoError

SUBCOMMANDS = ("synth", "shards", "train", "submit", "eval", "export", "inspect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mohico",
        description="Self-supervised video pretraining on untrimmed videos (MCL, HiCo, MotionSqueeze).",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage or config error. "
               "`mohico COMMAND --help` for each command.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        mod = importlib.import_module(f"mohico.launcher.commands.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)   # argparse exits 2 on usage errors
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args._module.run(args) or 0)
    except MohicoError as e:
        if args.debug:
            raise
        print(f"mohico {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mohico {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
