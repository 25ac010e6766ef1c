"""The trainer's console window line (mohico.trainer.run_log) against what W&B got in the window."""
from __future__ import annotations

# the headline's own forms of four window metrics ("0.12 s/step 96.0 clips/s wait=44% mem=310 MB")
SHOWN_APART = {"perf/step_time_s": " s/step ", "perf/clips_per_s": " clips/s ", "perf/data_wait_frac": " wait=",
               "perf/memory_mb": " mem="}


def missing_from_line(line: str, rows: list[dict]) -> list[str]:
    """The keys of ``rows`` (W&B's rows of one window; ``step`` ignored) that ``line`` does not show."""
    keys = {k for row in rows for k in row if k != "step"}
    return sorted(k for k in keys if SHOWN_APART.get(k, f" {k}=") not in line)
