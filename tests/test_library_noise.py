"""Issue 28 item 2: a quiet console. Library messages a user cannot act on are filtered at their
source by their exact text (mohico/library_noise.py); shipped configs do not warn about themselves.
(The end-to-end check, a default 2-rank tiny_cpu run printing no warning, is in tests/test_trainer.py.)"""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import mohico  # noqa: F401 - installs the filters
from mohico import library_noise
from mohico.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_deepspeed_logger_drops_exactly_the_listed_messages(caplog):
    library_noise.install()
    logger = logging.getLogger(library_noise.DEEPSPEED_LOGGER)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    logger.addHandler(h)
    try:
        logger.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("some other DeepSpeed warning")
    finally:
        logger.removeHandler(h)
    assert seen == ["some other DeepSpeed warning"]


def test_the_all_gather_future_warning_is_ignored_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library_noise.install()          # after catch_warnings reset the filters
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.something_else` is deprecated.", FutureWarning)
    assert [str(w.message) for w in caught] == ["`torch.distributed.something_else` is deprecated."]


@pytest.mark.slow
def test_importing_mohico_silences_deepspeeds_accelerator_line():
    env_cmd = ("import os; os.environ.pop('DS_ACCELERATOR', None); import mohico; "
               "import deepspeed.accelerator as a; print(a.get_accelerator().device_name())")
    res = subprocess.run([sys.executable, "-c", env_cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Setting accelerator" not in res.stdout + res.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_satisfy_their_own_rules(path):
    """A shipped config must not warn about itself: its shuffle buffer holds a whole read's samples
    apart (mohico.datasets.load.pipeline's rule), and tiny_cpu acknowledges its 2 x 2 MAL map."""
    cfg = load_config(path)
    d = cfg.data
    one_sample_per_read = path.name == "motion_bench_cpu.yaml"    # 8-s videos < seconds_per_sample: one draw a read
    if d.samples_per_read > 1 and not one_sample_per_read:
        assert d.shuffle_buffer >= (d.batch_size - 1) * (d.samples_per_read - 1) + 1, path.name
    if one_sample_per_read:                      # the benchmark's videos (motion_ablation.make_data) are 8 s long
        assert d.seconds_per_sample > 8.0 and d.shuffle_buffer == 32, "keep the recorded benchmark's loader"
    if path.name in ("tiny_cpu.yaml",):          # 32-px crops: R3D-18's late map is 2 x 2 by design
        assert d.crop_size // 16 * (d.crop_size // 16) >= cfg.objectives.mcl.mal.min_cells
