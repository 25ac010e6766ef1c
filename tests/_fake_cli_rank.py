"""One torchrun worker running the real ``mohico`` CLI around the fake module and loader of
tests/_fake_train.py, so the launcher's failure paths run end to end in seconds:

    spawn_local(2, ["--script", "tests/_fake_cli_rank.py", "train", CONFIG, *overrides])

(``mohico.launcher.spawn`` runs this file as each rank; its arguments are the CLI's.)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mohico.trainer.train as _train  # noqa: E402
from tests._fake_train import FakeLoader, FakeModule  # noqa: E402

_train._default_module = lambda cfg: FakeModule()
_train._default_loader = FakeLoader

from mohico.launcher.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
