"""`mohico eval` (not built yet in this release)."""
from mohico.errors import NotBuiltError

HELP = "eval (not built yet)"


def add_arguments(p):
    p.add_argument("args", nargs="*", help="arguments (the command is not built yet)")


def run(args) -> int:
    raise NotBuiltError("'mohico eval' is not built yet in this release")
