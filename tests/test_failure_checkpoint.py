"""Checkpoint corruptions and hostile checkpoint files (issue 14, items 5 and 7): every corruption
either falls back to the newest intact checkpoint with a warning or stops with a clear error; a
hostile file never runs code. Units on the checkpoint protocol with a fake engine (the
end-to-end runs are in tests/test_failure_train.py)."""
from __future__ import annotations

import errno
import json
import pathlib

import pytest
import torch

from mohico.config import config_hash, load_config, to_dict
from mohico.errors import MohicoError
from mohico.trainer import checkpoint as ck
from mohico.trainer.checkpoint.verify import file_digests, verify_checkpoint
from mohico.trainer.checkpoint.resume import pick_resume
from mohico.trainer.rng import rng_state
from tests._states import states_for


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes at ZeRO 0 (one file per tag)."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (pathlib.Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"backbone.w": torch.arange(4.0)}, **client_state},
                   pathlib.Path(save_dir) / tag / "mp_rank_00_model_states.pt")


def make_run(tmp_path, steps=(2, 4, 6), keep=3):
    c = load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18"])
    cp = ck.Checkpointer(tmp_path / "run", rank=0, world_size=1, keep=keep)
    for s in steps:
        meta = {"step": s, "world_size": 1, "zero_stage": 0, "config": to_dict(c), "config_hash": config_hash(c)}
        cp.save(states_for(FakeEngine(), meta, loader={"n": s}, rng=rng_state()))
    return cp


class Hostile:
    """Unpickling this runs ``Path(marker).touch()``: what a poisoned checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_meta_records_size_and_sha256_of_every_file(tmp_path):
    cp = make_run(tmp_path, steps=(2,))
    folder = cp.dir / "step_00000002"
    meta = json.loads((folder / ck.META).read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != ck.META)
    assert sorted(meta["files"]) == on_disk == ["client_rank_00000.pt", "mp_rank_00_model_states.pt"]
    assert meta["files"] == file_digests([folder / n for n in on_disk])        # hashlib over the bytes
    assert verify_checkpoint(cp.dir, "step_00000002") == []


def _truncate(folder):
    p = folder / "client_rank_00000.pt"
    p.write_bytes(p.read_bytes()[:100])


def _flip_byte(folder):
    p = folder / "mp_rank_00_model_states.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _delete(folder):
    (folder / "client_rank_00000.pt").unlink()


def _bad_meta(folder):
    (folder / ck.META).write_text("{not json")


def _delete_folder(folder):
    import shutil

    shutil.rmtree(folder)


@pytest.mark.parametrize("corrupt, problem", [(_truncate, "truncated"), (_flip_byte, "sha256 differs"),
                                              (_delete, "missing"), (_bad_meta, "unreadable"),
                                              (_delete_folder, "does not exist")])
def test_damaged_latest_falls_back_to_newest_intact(tmp_path, caplog, corrupt, problem):
    cp = make_run(tmp_path)
    corrupt(cp.dir / "step_00000006")
    with caplog.at_level("WARNING", logger="mohico.trainer"):
        assert pick_resume(cp, "auto", False) == (cp.dir, "step_00000004")
    assert problem in caplog.text and "step_00000006" in caplog.text
    assert ck.read_latest(cp.dir) == "step_00000004"
    if corrupt is not _delete_folder:   # moved aside, kept for inspection, never pruned or loaded again
        assert (cp.dir / "damaged-step_00000006").is_dir() and not (cp.dir / "step_00000006").exists()
    assert ck.complete_tags(cp.dir) == ["step_00000002", "step_00000004"]
    states = ck.load_rank_states(cp.dir, "step_00000004", 1)
    assert states[0]["loader"] == {"n": 4}


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    cp = make_run(tmp_path, steps=(2, 4))
    _truncate(cp.dir / "step_00000002")
    _flip_byte(cp.dir / "step_00000004")
    with pytest.raises(MohicoError) as e:
        pick_resume(cp, "auto", False)
    msg = str(e.value)
    assert "no intact checkpoint" in msg and "step_00000002" in msg and "step_00000004" in msg and "new run.dir" in msg


def test_explicit_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    cp = make_run(tmp_path, steps=(2, 4))
    _truncate(cp.dir / "step_00000004")
    with pytest.raises(MohicoError, match=r"step_00000004 is damaged \(client_rank_00000.pt has 100 bytes"):
        pick_resume(cp, str(cp.dir / "step_00000004"), False)


def test_latest_naming_a_path_outside_is_ignored(tmp_path):
    cp = make_run(tmp_path, steps=(2,))
    victim = tmp_path / "victim"
    victim.mkdir()
    (cp.dir / ck.LATEST).write_text("../../victim")
    assert pick_resume(cp, "auto", False) == (cp.dir, "step_00000002")
    assert victim.is_dir()                     # never moved or deleted


def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path):
    cp = make_run(tmp_path, steps=(2, 4))
    with pytest.raises(MohicoError) as e:
        pick_resume(cp, "never", False)
    msg = str(e.value)
    assert "already holds checkpoints" in msg and "new run.dir" in msg and "checkpoint.force=true" in msg
    assert ck.complete_tags(cp.dir) == ["step_00000002", "step_00000004"]
    assert pick_resume(cp, "never", True) is None                      # forced: starts fresh


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:659] . unexpected pos 320 vs 256")])
def test_disk_full_is_reported_as_disk_full(tmp_path, monkeypatch, error):
    cp = make_run(tmp_path, steps=(2,))

    def full(obj, path):
        pathlib.Path(path).write_bytes(b"x" * 10)
        raise error

    monkeypatch.setattr(torch, "save", full)
    c = load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18"])
    with pytest.raises(MohicoError) as e:
        cp.save(states_for(FakeEngine(), {"step": 4, "world_size": 1, "config": to_dict(c)}))
    msg = str(e.value)
    assert msg.startswith("rank 0: disk full while writing checkpoint step 4")
    assert "MiB are free" in msg and str(cp.dir / "step_00000002") in msg and "checkpoint.keep" in msg
    assert not (cp.dir / ".tmp-step_00000004").exists()                # the partial write is gone
    assert ck.read_latest(cp.dir) == "step_00000002" and verify_checkpoint(cp.dir, "step_00000002") == []


def test_poisoned_client_state_runs_no_code_on_resume(tmp_path):
    cp = make_run(tmp_path, steps=(2,))
    marker = tmp_path / "pwned"
    folder = cp.dir / "step_00000002"
    torch.save({"rank": 0, "loader": Hostile(marker)}, folder / "client_rank_00000.pt")
    meta = json.loads((folder / ck.META).read_text())   # an attacker can rewrite the digests too
    meta["files"].update(file_digests([folder / "client_rank_00000.pt"]))
    (folder / ck.META).write_text(json.dumps(meta))
    assert pick_resume(cp, "auto", False) == (cp.dir, "step_00000002")
    with pytest.raises(MohicoError, match="client_rank_00000.pt: cannot load.*never loads"):
        ck.load_rank_states(cp.dir, "step_00000002", 1)
    assert not marker.exists()


def test_poisoned_model_file_runs_no_code_on_export(tmp_path):
    cp = make_run(tmp_path, steps=(2,))
    marker = tmp_path / "pwned"
    torch.save({"module": {"backbone.w": torch.zeros(1)}, "x": Hostile(marker)},
               cp.dir / "step_00000002" / "mp_rank_00_model_states.pt")
    from mohico.models.backbone_file import load_backbone

    with pytest.raises(MohicoError, match="mp_rank_00_model_states.pt: cannot load"):
        load_backbone(cp.dir.parent)
    assert not marker.exists()


def test_poisoned_optimizer_partition_runs_no_code_in_universal_conversion(tmp_path):
    from mohico.trainer.checkpoint.universal import write_universal

    cp = make_run(tmp_path, steps=(2,))
    marker = tmp_path / "pwned"
    folder = cp.dir / "step_00000002"
    torch.save({"optimizer_state_dict": Hostile(marker)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {}, "param_shapes": []}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(MohicoError, match="cannot load"):
        write_universal(folder, tmp_path / "universal")
    assert not marker.exists()


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00\x81binary\x00\x9c", b"step_\xc3\x28", b"\x00" * 64, b"x" * 100000])
def test_binary_latest_falls_back_to_newest_intact(tmp_path, caplog, garbage):
    cp = make_run(tmp_path, steps=(2, 4))
    (cp.dir / ck.LATEST).write_bytes(garbage)
    assert ck.read_latest(cp.dir) is None or not ck.TAG_RE.match(ck.read_latest(cp.dir))   # read, never raises
    with caplog.at_level("WARNING", logger="mohico.trainer"):
        assert pick_resume(cp, "auto", False) == (cp.dir, "step_00000004")
    assert str(cp.dir / ck.LATEST) in caplog.text and "not a checkpoint tag" in caplog.text
    assert ck.read_latest(cp.dir) == "step_00000004"                  # rewritten to the checkpoint resumed from
    with pytest.raises(MohicoError, match="latest"):                  # export & co: a clear error, no traceback
        (cp.dir / ck.LATEST).write_bytes(garbage)
        ck.resolve_checkpoint(cp.dir.parent)


def test_latest_older_than_intact_checkpoints_is_refused(tmp_path):
    """`latest` names an older intact tag while newer intact ones exist (a restored or hand-edited
    `latest`): resuming there would later overwrite and rotate away the newer ones. Refused (exit
    2) naming them and both fixes; nothing is moved or deleted."""
    from mohico.errors import ConfigError

    cp = make_run(tmp_path, steps=(2, 4, 6))
    (cp.dir / ck.LATEST).write_text("step_00000002")
    with pytest.raises(ConfigError) as e:
        pick_resume(cp, "auto", False)
    msg = str(e.value)
    assert e.value.exit_code == 2
    assert "step_00000004" in msg and "step_00000006" in msg and str(cp.dir / ck.LATEST) in msg
    assert f"checkpoint.resume={cp.dir / 'step_00000006'}" in msg            # resume from the newest
    assert f"checkpoint.resume={cp.dir / 'step_00000002'}" in msg and "superseded" in msg
    assert ck.complete_tags(cp.dir) == ["step_00000002", "step_00000004", "step_00000006"]
    assert ck.read_latest(cp.dir) == "step_00000002"


def test_latest_older_than_only_damaged_checkpoints_resumes_from_latest(tmp_path, caplog):
    cp = make_run(tmp_path, steps=(2, 4))
    (cp.dir / ck.LATEST).write_text("step_00000002")
    _flip_byte(cp.dir / "step_00000004")
    with caplog.at_level("WARNING", logger="mohico.trainer"):
        assert pick_resume(cp, "auto", False) == (cp.dir, "step_00000002")
    assert (cp.dir / "damaged-step_00000004").is_dir() and "sha256 differs" in caplog.text   # kept aside


def test_resuming_an_older_checkpoint_keeps_the_newer_ones_aside(tmp_path, caplog):
    """checkpoint.resume=<an older checkpoint of this run>: the newer checkpoints are renamed to
    <tag>.superseded-<time> (kept, never loaded or pruned) with a warning naming each, so the
    saves that follow never overwrite or rotate them away."""
    from mohico.trainer.checkpoint.resume import find_resume

    cp = make_run(tmp_path, steps=(2, 4, 6))
    cp.keep = 2                # rotation would delete them
    older = cp.dir / "step_00000002"
    c = load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18", f"checkpoint.resume={older}"])
    with caplog.at_level("WARNING", logger="mohico.trainer"):
        r = find_resume(cp, c, None)
    assert (r.dir, r.tag) == (cp.dir, "step_00000002")
    aside = sorted(p for p in cp.dir.iterdir() if ".superseded-" in p.name)
    assert [p.name.split(".")[0] for p in aside] == ["step_00000004", "step_00000006"]
    for p in aside:
        assert p.name in caplog.text
    for s in (4, 6):      # the run goes on from step 2 and writes steps 4 and 6 again
        meta = {"step": s, "world_size": 1, "zero_stage": 0, "config": to_dict(c), "config_hash": config_hash(c)}
        cp.save(states_for(FakeEngine(), meta, loader={"n": -s}, rng=rng_state()))
    assert [torch.load(p / "client_rank_00000.pt")["loader"] for p in aside] == [{"n": 4}, {"n": 6}]  # untouched
    assert verify_checkpoint(cp.dir, aside[0].name) == []


@pytest.mark.parametrize("echo", [FileNotFoundError(2, "No such file or directory"),
                                  RuntimeError("Parent directory /x/.tmp-step_00000004 does not exist.")])
def test_a_write_that_fails_because_a_peer_removed_the_folder_names_the_peer(tmp_path, echo):
    """Rank 1's write of checkpoint 4 failed (disk full): it removed the partial folder while rank 0
    was still writing into it. Rank 0's own error is only the echo -- the file system's
    FileNotFoundError or torch.save's RuntimeError for a vanished parent directory (this one failed a
    fresh-clone run: rank 0 then reported its own write instead of rank 1's disk full) -- so it stops
    naming rank 1 and its note. A disk-full error of its own, with the folder still there, stays its
    own message."""
    from mohico.errors import PeerFailureError

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "failed_rank1.txt").write_text("rank 1: disk full while writing checkpoint step 4 to X")
    cp = ck.Checkpointer(run, rank=0, world_size=2, keep=1)
    tmp = cp.dir / ".tmp-step_00000004"                  # removed by rank 1: it does not exist
    err = cp._write_failed(echo, tmp, 4)
    assert isinstance(err, PeerFailureError), err
    assert "rank 1" in str(err) and "disk full while writing checkpoint step 4" in str(err), str(err)
    tmp.mkdir(parents=True)                               # this rank's own disk full: its own message
    own = cp._write_failed(OSError(errno.ENOSPC, "No space left on device"), tmp, 4)
    assert not isinstance(own, PeerFailureError) and str(own).startswith("rank 0: disk full"), str(own)
