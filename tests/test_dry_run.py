"""`mohico train --dry-run` says what a real run would trip over (issue 30, item 4): a memory bank
too big for a rank (the memory it needs per rank; refused when it exceeds this machine's memory),
clips longer than every video of the shards, and a `latest` of any bytes. In-process (main())."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mohico.launcher.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
GiB = 2 ** 30


def dry(capsys, tmp_path, *overrides) -> tuple[int, str]:
    code = main(["train", str(TINY), f"run.dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'none'}",
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
    """Tars of sample jsons only (what the check reads), one list of frame counts per shard."""
    folder.mkdir()
    for n, shard in enumerate(frames):
        with tarfile.open(folder / f"shard-{n:06d}.tar", "w") as tar:
            for i, num in enumerate(shard):
                data = json.dumps({"num_frames": num, "fps": fps, "width": 64, "height": 48}).encode()
                info = tarfile.TarInfo(f"v{n}_{i}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


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
