"""`mohico train --dry-run` and `mohico submit --dry-run` say what a real run would trip over
(issue 30, item 4; issue 28): a memory bank too big for a rank (the memory it needs per rank;
refused when it exceeds this machine's memory), clips longer than every video of the shards, a
`latest` of any bytes; and each refusal of the run's start-up, in a second, with exit 2 naming the
key and the fix (issue 28): `data.shards` that match no file or files that are no mohico shards,
shards whose resolution is below the crop, fewer samples than ranks x loader workers, a
checkpoint in run.dir whose config refuses this one, W&B online without an API key, a run.dir
that cannot be written. All problems are reported together. In-process (main())."""
from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from mohico.launcher.cli import main
from tests._fake_shards import fake_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
GiB = 2 ** 30


def good_shards(tmp_path: Path) -> Path:
    """Shards tiny_cpu's start-up accepts: 72 px short side (its 32 px crops of >= 20% of the frame
    need 72), 4 videos of 40 frames (a clip spans 7), more samples than its 1 rank x 1 worker."""
    folder = tmp_path / "good-shards"
    return folder if folder.is_dir() else fake_shards(folder, [[40, 40], [40, 40]], manifest=True)


@pytest.fixture
def no_slurm_controller(tmp_path, monkeypatch):
    """`sinfo` answers as on a machine without a SLURM controller (submit then leaves
    --cpus-per-task to SLURM), whatever this machine runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text('#!/bin/bash\necho "Unable to contact slurm controller" >&2\nexit 1\n')
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def dry(capsys, tmp_path, *overrides, command="train") -> tuple[int, str]:
    code = main([command, str(TINY), f"run.dir={tmp_path / 'run'}", f"data.shards={good_shards(tmp_path)}",
                 *overrides, "--dry-run"])
    return code, capsys.readouterr().err


@pytest.fixture
def host_memory(monkeypatch):
    """This machine's memory as the dry run sees it: 64 GiB, whatever the test machine has."""
    try:
        from mohico.launcher import dry_run
    except ImportError:        # (a release without the check)
        return
    monkeypatch.setattr(dry_run, "host_memory", lambda: 64 * GiB)


def test_a_bank_bigger_than_the_machine_is_refused_with_its_memory_per_rank(capsys, tmp_path, host_memory):
    code, err = dry(capsys, tmp_path, "bank.size=1000000000")
    # two banks (MCL's and HiCo's), 1e9 keys x (128 float32 + an int64 id) each, on one rank
    need = 2 * 1_000_000_000 * (128 * 4 + 8) / GiB
    assert code == 2 and "'bank.size'" in err and f"{need:.1f} GiB per rank" in err and "64.0 GiB" in err
    code, err = dry(capsys, tmp_path, "bank.size=1000000000", "--nproc", "4")     # spread over 4 ranks
    assert code == 2 and f"{need / 4:.1f} GiB per rank" in err and "4 local ranks" in err


def test_a_large_bank_is_warned_with_its_memory_per_rank(capsys, tmp_path, host_memory):
    code, err = dry(capsys, tmp_path, "bank.size=20000000")
    need = 2 * 20_000_000 * (128 * 4 + 8) / GiB
    assert code == 0 and "warning" in err and "bank.size" in err and f"{need:.1f} GiB per rank" in err
    code, err = dry(capsys, tmp_path)                                                # tiny_cpu's 256 keys
    assert code == 0 and "warning" not in err and "bank:" in err


def test_an_in_batch_mcl_is_counted_without_a_bank(capsys, tmp_path, host_memory):
    """MCL with in-batch negatives keeps no bank (its module builds none): the dry run counted one."""
    code, err = dry(capsys, tmp_path, "objectives.mcl.negatives=batch", "objectives.hico.weight=0")
    assert code == 0 and "bank: none" in err, err
    code, err = dry(capsys, tmp_path, "objectives.mcl.negatives=batch")          # HiCo's bank only
    assert code == 0 and "in 1 bank(s) (HiCo)" in err, err


def _shards(folder: Path, frames: list[list[int]], fps: float = 15.0) -> Path:
    """Tars of samples (a json and a placeholder video each), one list of frame counts per shard."""
    return fake_shards(folder, frames, fps=fps)


def test_clips_longer_than_every_video_are_refused(capsys, tmp_path):
    shards = _shards(tmp_path / "shards", [[10, 12, 9], [11]])
    # tiny_cpu: 4 frames at stride 2 (reference_fps 15 = the shards' fps): a clip spans 7 frames
    code, err = dry(capsys, tmp_path, f"data.shards={shards}")
    assert code == 0 and "data.clip_len" not in err and "warning" not in err
    code, err = dry(capsys, tmp_path, f"data.shards={shards}", "data.clip_len=16")   # spans 31 frames
    assert code == 2 and "'data.clip_len'" in err and "31 frames" in err and "every one of the 4 videos" in err
    assert "longest: 12" in err


def test_clips_longer_than_some_videos_are_counted(capsys, tmp_path):
    shards = _shards(tmp_path / "shards", [[10, 40, 9], [11]])
    code, err = dry(capsys, tmp_path, f"data.shards={shards}", "data.clip_len=16")
    assert code == 0 and "warning" in err and "3 of the 4 videos" in err and "31 frames" in err


def test_dry_run_reads_a_binary_latest(capsys, tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "latest").write_bytes(b"\xff\xfe\x00binary")
    code, err = dry(capsys, tmp_path)
    assert code == 0 and "Traceback" not in err and "not a checkpoint tag" in err


# --------------------------------------------------------------------------- issue 28: start-up's refusals
def test_shards_that_match_no_file_are_refused(capsys, tmp_path):
    code, err = dry(capsys, tmp_path, f"data.shards={tmp_path / 'none'}")
    assert code == 2 and "data.shards: shard" in err and str(tmp_path / "none") in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, err = dry(capsys, tmp_path, f"data.shards={tmp_path / 'empty'}")
    assert code == 2 and "data.shards: directory" in err and "holds no *.tar shards" in err
    code, err = dry(capsys, tmp_path, f"data.shards={tmp_path / 'good-shards' / 'shard-{000000..000003}.tar'}")
    assert code == 2 and "shard-000002.tar does not exist" in err       # the pattern names 4 shards, 2 exist
    code = main(["train", str(ROOT / "configs" / "mcl_r2plus1d_k400.yaml"), f"run.dir={tmp_path / 'run'}", "--dry-run"])
    err = capsys.readouterr().err                                          # base.yaml's data.shards: ""
    assert code == 2 and "data.shards: no shards given: set data.shards to the folder `mohico shards` wrote" in err


def _not_shards(folder: Path, kind: str) -> Path:
    folder.mkdir()
    for n in range(2):
        path = folder / f"shard-{n:06d}.tar"
        if kind == "empty file":
            path.write_bytes(b"")
        elif kind == "not a tar":
            path.write_bytes(b"just some text, not a tar\n" * 40)
        elif kind == "no sample":
            tarfile.open(path, "w").close()
        elif kind == "text files":
            with tarfile.open(path, "w") as tar:
                for i in range(3):
                    notes = folder / f"notes{i}.txt"
                    notes.write_text(f"note {i}\n")
                    tar.add(notes, arcname=notes.name)
    return folder


@pytest.mark.parametrize("kind, why", [
    ("empty file", "is an empty file"),
    ("not a tar", "is not a readable tar"),
    ("no sample", "holds no sample"),
    ("text files", "holds no usable sample (first: "),
])
def test_files_that_are_not_mohico_shards_are_refused(capsys, tmp_path, kind, why):
    folder = _not_shards(tmp_path / "s", kind)
    code, err = dry(capsys, tmp_path, f"data.shards={folder}")
    assert code == 2 and "'data.shards': none of the 2 shard(s) gives a usable sample" in err and why in err
    assert str(folder / "shard-000000.tar") in err and "written by `mohico shards`" in err


def test_shards_without_video_members_are_refused_and_one_bad_shard_is_warned(capsys, tmp_path):
    json_only = fake_shards(tmp_path / "json-only", [[40, 40]], video=False)
    code, err = dry(capsys, tmp_path, f"data.shards={json_only}")
    assert code == 2 and "no video member (webm/mp4/mkv/avi/mov)" in err
    mixed = fake_shards(tmp_path / "mixed", [[40, 40], [40, 40]])
    (mixed / "shard-000001.tar").write_bytes(b"")                         # one of two shards is empty
    code, err = dry(capsys, tmp_path, f"data.shards={mixed}")
    assert code == 0 and "warning: 'data.shards': 1 of the shards give no usable sample" in err
    assert "shard-000001.tar is an empty file" in err


@pytest.mark.parametrize("manifest", [False, True])
def test_shards_smaller_than_the_crop_are_refused(capsys, tmp_path, manifest):
    # tiny_cpu: 32 px crops of >= 20% of the frame (aspect 3/4..4/3) need a 72 px short side
    small = fake_shards(tmp_path / "small", [[40, 40], [40, 40]], size=(64, 48), manifest=manifest)
    code, err = dry(capsys, tmp_path, f"data.shards={small}")
    assert code == 2 and "'data.crop_size': 32 px crops need shards with a short side of at least 72 px" in err
    assert "says 48" in err and "mohico shards SRC OUT --short-side 72" in err
    assert dry(capsys, tmp_path, f"data.shards={small}", "data.crop_size=20")[0] == 0


def test_fewer_samples_than_ranks_x_workers_are_refused(capsys, tmp_path, no_slurm_controller):
    three = fake_shards(tmp_path / "three", [[40, 40], [40]], manifest=True)      # 3 samples in 2 shards
    code, err = dry(capsys, tmp_path, f"data.shards={three}", "data.num_workers=2", "--nproc", "2")
    assert code == 2 and "data.shards: 3 samples in 2 shard(s) (per manifest.json) for 2 rank(s) x 2 loader " \
                         "workers = 4 streams" in err and "Lower data.num_workers" in err
    assert dry(capsys, tmp_path, f"data.shards={three}", "data.num_workers=3")[0] == 0     # 3 streams: fine
    # a SLURM job of 2 nodes x 2 GPUs: 4 ranks x 1 worker
    code, err = dry(capsys, tmp_path, f"data.shards={three}", "--nodes", "2", "--gpus-per-node", "2", command="submit")
    assert code == 2 and "for 4 rank(s) x 1 loader workers = 4 streams" in err


def _checkpoint(tmp_path: Path, step: int = 350, *overrides: str) -> Path:
    """A checkpoint's meta in run.dir as the checkpointer writes it (TrainState's dict + the layout),
    for tiny_cpu with this test's run.dir and shards; ``latest`` names it."""
    from mohico.config import load_config
    from mohico.trainer.checkpoint.layout import FORMAT, META, tag_for
    from mohico.trainer.states import TrainState

    cfg = load_config(TINY, [f"run.dir={tmp_path / 'run'}", f"data.shards={good_shards(tmp_path)}", *overrides])
    state = TrainState(cfg, 1)
    state.step = step
    folder = tmp_path / "run" / "checkpoints" / tag_for(step)
    folder.mkdir(parents=True)
    (folder / META).write_text(json.dumps({**state.state_dict(), "format": FORMAT}))
    (folder.parent / "latest").write_text(folder.name)
    return folder


def test_a_checkpoint_whose_config_hash_refuses_this_config_is_refused(capsys, tmp_path):
    ck = _checkpoint(tmp_path)
    code, err = dry(capsys, tmp_path)                                  # the same config: resumes
    assert code == 0 and f"resume from {ck}" in err
    code, err = dry(capsys, tmp_path, "trainer.max_steps=500", "data.num_workers=2")    # resume-safe changes
    assert code == 0 and f"resume from {ck}" in err
    code, err = dry(capsys, tmp_path, "optim.lr=0.01", "data.clip_len=6")
    assert code == 2 and f"resume from {ck}" in err                    # what it would have done, then why not
    assert f"checkpoint {ck} was written by a different config" in err
    assert "data.clip_len: 4 -> 6" in err and "optim.lr: 0.05 -> 0.01" in err
    assert "start over in a new run.dir, or set checkpoint.force=true" in err
    code, err = dry(capsys, tmp_path, "optim.lr=0.01", "checkpoint.force=true")
    assert code == 0


def test_starting_fresh_over_checkpoints_or_from_a_missing_one_is_refused(capsys, tmp_path):
    ck = _checkpoint(tmp_path)
    code, err = dry(capsys, tmp_path, "checkpoint.resume=never")
    assert code == 2 and f"checkpoint.resume=never, but run.dir {tmp_path / 'run'} already holds checkpoints " \
                         f"({ck.name})" in err and "Use a new run.dir" in err
    assert dry(capsys, tmp_path, "checkpoint.resume=never", "checkpoint.force=true")[0] == 0
    code, err = dry(capsys, tmp_path, f"checkpoint.resume={tmp_path / 'elsewhere'}")    # a checkpoint that is not there
    assert code == 2 and f"checkpoint.resume={tmp_path / 'elsewhere'}: no checkpoint at {tmp_path / 'elsewhere'}" in err
    assert dry(capsys, tmp_path, f"checkpoint.resume={ck}")[0] == 0


def test_a_checkpoint_of_another_layout_is_refused(capsys, tmp_path):
    ck = _checkpoint(tmp_path)
    meta = json.loads((ck / "mohico_meta.json").read_text())
    (ck / "mohico_meta.json").write_text(json.dumps({**meta, "format": 1}))
    code, err = dry(capsys, tmp_path)
    assert code == 2 and "is a checkpoint of layout 1, this mohico reads layout 2" in err and "new run.dir" in err


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))                   # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_wandb_online_without_an_api_key_is_refused(capsys, tmp_path, monkeypatch, no_wandb_key):
    code, err = dry(capsys, tmp_path, "wandb.mode=online")
    assert code == 2 and "'wandb.mode': wandb.mode=online but no W&B API key" in err
    assert "wandb.mode=offline" in err and "wandb.mode=disabled" in err and "wandb login" in err
    assert dry(capsys, tmp_path, "wandb.mode=auto")[0] == 0           # auto: offline without a key
    monkeypatch.setenv("WANDB_MODE", "online")                         # the environment wins over the config
    code, err = dry(capsys, tmp_path, "wandb.mode=auto")
    assert code == 2 and "WANDB_MODE=online (environment)" in err and "unset WANDB_MODE" in err
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert dry(capsys, tmp_path, "wandb.mode=online")[0] == 0


def test_a_run_dir_that_cannot_be_written_is_refused(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, err = dry(capsys, tmp_path, f"run.dir={tmp_path / 'a-file' / 'run'}")
    assert code == 2 and f"'run.dir': {tmp_path / 'a-file' / 'run'} cannot be created: {tmp_path / 'a-file'} is " \
                         f"not a folder" in err and "Set run.dir to a folder you can write" in err
    if os.geteuid() != 0:                                 # (root may write anywhere)
        (tmp_path / "locked").mkdir(mode=0o500)
        code, err = dry(capsys, tmp_path, f"run.dir={tmp_path / 'locked' / 'run'}")
        assert code == 2 and "is not writable by this user" in err


def test_start_up_refuses_that_run_dir_with_the_same_message(tmp_path):
    """The run lock (rank 0's first write) applies the dry run's rule (mohico.utils.unwritable_dir)."""
    from mohico.errors import ConfigError
    from mohico.trainer.run_lock import RunLock

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"'run.dir': .*a-file/run cannot be created: .*a-file is not a folder"):
        RunLock(tmp_path / "a-file" / "run").acquire()


def test_every_problem_is_reported_together_in_seconds(capsys, tmp_path, monkeypatch, no_wandb_key):
    _checkpoint(tmp_path)
    small = fake_shards(tmp_path / "small", [[40, 40]], size=(64, 48), manifest=True)    # 2 samples, 48 px
    t0 = time.perf_counter()
    code = main(["train", str(TINY), f"run.dir={tmp_path / 'run'}", f"data.shards={small}", "optim.lr=0.01",
                 "wandb.mode=online", "data.num_workers=2", "--nproc", "2", "--dry-run"])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"dry run with 4 problems: {seconds:.2f} s")
    assert code == 2 and "mohico train: error: 4 problems a run would stop on:" in err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 4 and "'data.crop_size'" in problems[0]
    assert "data.shards: 2 samples in 1 shard(s)" in problems[1] and "= 4 streams" in problems[1]
    assert "written by a different config" in problems[2] and "optim.lr: 0.05 -> 0.01" in problems[2]
    assert "'wandb.mode'" in problems[3]
    assert seconds < 10


def test_a_good_config_passes_and_says_what_it_would_run(capsys, tmp_path, synth_shards, no_slurm_controller):
    """The real shards of `mohico shards` (the session's synthetic set: 6 videos in 2 shards, 112 px)."""
    t0 = time.perf_counter()
    code = main(["train", str(TINY), f"run.dir={tmp_path / 'run'}", f"data.shards={synth_shards}", "--dry-run"])
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    with capsys.disabled():
        print(f"dry run of a good config: {seconds:.2f} s")
    assert code == 0 and seconds < 10
    assert f"shards: {synth_shards}" in out and "crop_size: 32" in out            # the resolved config
    assert "1 local rank(s)" in err and "start fresh (no checkpoint yet)" in err and "300 steps" in err
    assert "data.shards: 2 shard(s), 6 samples (manifest.json)" in err and "nothing a run would stop on" in err
    assert not (tmp_path / "run").exists()                                          # writes nothing
    code = main(["submit", str(TINY), f"run.dir={tmp_path / 'run'}", f"data.shards={synth_shards}",
                 "--nodes", "1", "--gpus-per-node", "2", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0 and "#SBATCH --nodes=1" in out and "nothing a run would stop on" in err
    assert "per rank at 2 rank(s)" in err
