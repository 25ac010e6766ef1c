"""The `mohico` command. Each subcommand lives in ``mohico/launcher/commands/<name>.py`` and
defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; heavy imports (torch,
DALI, DeepSpeed) happen inside ``run`` so ``--help`` stays fast. A command line naming a
command imports only that command's module (``mohico train`` never imports ``eval``'s);
``mohico`` alone, ``--help`` and an unknown command build the whole parser.

Exit codes: 0 success, 1 runtime failure, 2 usage or config error.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys

from mohico.errors import ExitCode, MohicoError
from mohico.rank_status import FINAL_ERROR

SUBCOMMANDS = ("synth", "shards", "train", "submit", "eval", "export", "inspect")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``mohico`` parser with every subcommand, or with ``only`` that one (its module alone imported)."""
    parser = argparse.ArgumentParser(
        prog="mohico",
        description="Self-supervised video pretraining on untrimmed videos (MCL, HiCo, MotionSqueeze).",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage or config error. "
               "`mohico COMMAND --help` for each command.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS if only is None else (only,):
        mod = importlib.import_module(f"mohico.launcher.commands.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_module=mod, _parser=p)
    return parser


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def unknown_option_message(option: str, known: list[str]) -> str:
    """'unknown option '--nprocs'; did you mean '--nproc'?' (closest of ``known``)."""
    flag = option.split("=", 1)[0]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f" (options: {', '.join(sorted(known))})"
    return f"unknown option '{flag}'{hint}"


def _check_long_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A ``--flag`` the command does not have (nor abbreviates) is a usage error naming the closest
    option, before argparse reports what else is missing."""
    command = next((a for a in argv if not a.startswith("-")), None)
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if command is None or subs is None or command not in subs.choices:
        return
    sub = subs.choices[command]
    known = option_strings(sub)
    for item in argv[argv.index(command) + 1:]:
        flag = item.split("=", 1)[0]
        if item.startswith("--") and flag != "--" and not any(k.startswith(flag) for k in known):
            sub.error(unknown_option_message(item, known))


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def is_override(item: str) -> bool:
    """``section.key=value`` (a dotted key, as every config override has) that is not an existing
    path: one override syntax for every command (positional ``k=v``; ``--set k=v`` still works)."""
    return bool(_OVERRIDE.match(item)) and not os.path.exists(item)


def _take_extras(args, extras: list[str]) -> None:
    """Arguments argparse left over: ``key=value`` overrides given after flags join the command's
    overrides (``mohico submit CONFIG --nodes 2 run.dir=x``); anything else is a usage error
    naming the closest option."""
    sub = args._parser
    for item in extras:
        if item.startswith("-"):
            sub.error(unknown_option_message(item, option_strings(sub)))
        if "=" in item and isinstance(getattr(args, "overrides", None), list):
            args.overrides.append(item)
        else:
            sub.error(f"unexpected argument {item!r} (config overrides are key=value, e.g. optim.lr=0.1)")


def _named_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` runs when only ``--debug`` precedes it (then the parser needs that
    command alone), else None (``--help``, an unknown command or option: the whole parser answers)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        return None
    before = argv[:argv.index(command)]
    return command if all(len(a) >= 3 and "--debug".startswith(a) for a in before) else None


def report_status(e: MohicoError) -> None:
    """Under `mohico train --nproc N`, tell the launcher this rank's code and line (a rank that only
    followed a peer says so: the launcher then names the peer's cause)."""
    from mohico.errors import PeerFailureError
    from mohico import rank_status

    rank_status.report(e.exit_code, str(e), follows_peer=isinstance(e, PeerFailureError))


class _NotTheFinalError(logging.Filter):
    """Drops the log record of the error a rank stops with (``extra={FINAL_ERROR: True}``) from
    the console: under `mohico train --nproc N` the launcher prints it once (the rank's log file
    keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, FINAL_ERROR, False)


def _under_spawn_launcher() -> bool:
    from mohico.rank_status import STATUS_DIR_VAR

    return bool(os.environ.get(STATUS_DIR_VAR))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_named_command(argv))
    _check_long_options(parser, argv)
    args, extras = parser.parse_known_args(argv)   # argparse exits 2 on usage errors
    if args.command is None:
        if extras:
            parser.error(unknown_option_message(extras[0], option_strings(parser)) if extras[0].startswith("-")
                         else f"unknown command {extras[0]!r}")
        parser.print_help()
        return ExitCode.CONFIG.value
    _take_extras(args, extras)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args.debug = bool(args.debug) or os.environ.get("MOHICO_DEBUG") == "1"   # a rank of `mohico --debug train --nproc N`
    quiet_rank = _under_spawn_launcher() and not args.debug   # the launcher prints a rank's error once
    if quiet_rank:
        for h in logging.getLogger().handlers:
            h.addFilter(_NotTheFinalError())
    try:
        return int(args._module.run(args) or 0)
    except MohicoError as e:
        report_status(e)
        if args.debug:
            raise
        if not quiet_rank:
            print(f"mohico {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mohico {args.command}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED.value


if __name__ == "__main__":
    sys.exit(main())
