"""`mohico export` (not built yet in this release)."""
from mohico.errors import NotBuiltError

HELP = "export (not built yet)"


def add_arguments(p):
    p.add_argument("args", nargs="*", help="arguments (the command is not built yet)")


def run(args) -> int:
    raise NotBuiltError("'mohico export' is not built yet in this release")
