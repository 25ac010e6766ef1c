import sys

from mohico.launcher.cli import main

sys.exit(main())
