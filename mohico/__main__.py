import sys

from mohico.launcher.cli import _named_command, main
from mohico.launcher.process_exit import exit_process

code = main()
if _named_command(sys.argv[1:]) == "train":   # a rank under srun, or the local launcher: skip the C teardown
    exit_process(code)
sys.exit(code)
