"""Clip geometry in seconds: the same config spans the same time on shards of any fps, the paper
configs reproduce their papers' clip durations and crop scales, and crops that would upsample the
shards' frames fail at start with the fix."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mohico.config import Config, load_config
from mohico.datasets.load import sampling as S
from mohico.datasets.load.shard_geometry import check_crop_resolution, required_short_side, shards_short_side
from mohico.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Papers (docs/METHODS.md): clip duration = frames x stride / fps of the source video, and crop scale.
PAPER = {
    # MCL: 16 frames at stride 2 of Kinetics (25-30 fps): ~1.1 s; area U(0.2, 1), aspect 3/4-4/3
    "mcl_r2plus1d_k400": {"seconds": 16 * 2 / 30, "area": (0.2, 1.0), "aspect": (0.75, 4 / 3), "crop": 224},
    # HiCo: 16 frames at rate 4 of 30 fps: ~2.1 s; 112 x 112, scale 0.324-0.576, aspect 1
    "hico_s3d_uk400": {"seconds": 16 * 4 / 30, "area": (0.324, 0.576), "aspect": (1.0, 1.0), "crop": 112},
    # MSNet: 8 frames by segment-based (TSN) sampling over a ~10 s Kinetics video; MCL's crop here
    "msnet_r50": {"seconds": 10.0, "area": (0.2, 1.0), "aspect": (0.75, 4 / 3), "crop": 224},
}


def clip_seconds(frames: np.ndarray, fps: float) -> float:
    """Time a clip covers: from its first frame to the end of its last one, ``frames: (T,)``,
    as T frames at a constant stride cover T x stride frame periods."""
    T = len(frames)
    return float(frames[-1] - frames[0]) / fps * T / (T - 1)


@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("fps", [15.0, 25.0, 29.97, 30.0, 60.0])
def test_paper_configs_sample_the_papers_spans(name, fps):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    want = PAPER[name]
    assert tuple(cfg.sampling.crop_area) == pytest.approx(want["area"])
    assert tuple(cfg.sampling.crop_aspect) == pytest.approx(want["aspect"], rel=1e-6)
    assert cfg.data.crop_size == want["crop"]
    mcl, hico = cfg.objectives.mcl.weight > 0, cfg.objectives.hico.weight > 0
    cs = S.ClipSampler(cfg.sampling, cfg.data, mcl=mcl, hico=hico)
    n = int(fps * 60)                                 # a one-minute video
    meta = {"num_frames": n, "fps": fps, "width": 680, "height": 512, "tmotion": np.ones(n).tolist()}
    for i in range(20):
        d = cs.sample(meta, None, S.sample_rng(0, 0, 0, f"k{i}"))
        assert d.frames.shape[1] == cfg.data.clip_len
        for fr in d.frames:
            assert clip_seconds(fr, fps) == pytest.approx(want["seconds"], rel=0.10), (fr, fps)
            # every frame is the stored frame nearest to its wanted time
            t = fr[0] / fps + np.arange(len(fr)) * cfg.data.frame_stride / cfg.data.reference_fps
            assert np.abs(fr / fps - t).max() <= 0.5 / fps + 1e-9


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_headers_give_a_shards_command_that_passes_the_check(name):
    text = (ROOT / "configs" / f"{name}.yaml").read_text()
    cmd = next(line for line in text.splitlines() if line.startswith("#") and "mohico shards" in line)
    side = int(re.search(r"--short-side (\d+)", cmd).group(1))
    fps = float(re.search(r"--fps (\d+)", cmd).group(1))
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert side >= required_short_side(cfg.data.crop_size, cfg.sampling.crop_area, cfg.sampling.crop_aspect)
    assert side % 2 == 0 and fps >= cfg.data.reference_fps


def smallest_box_side(short_side: float, area, aspect) -> float:
    """float64 reference: a 4:3 frame, the smallest area at both extreme aspects."""
    H, W = float(short_side), 4.0 / 3.0 * short_side
    sides = []
    for r in (aspect[0], aspect[1]):
        a = area[0] * H * W
        sides += [min(math.sqrt(a * r), W), min(math.sqrt(a / r), H)]
    return min(sides)


@pytest.mark.parametrize("crop,area,aspect", [(224, (0.2, 1.0), (0.75, 4 / 3)), (112, (0.324, 0.576), (1.0, 1.0)),
                                              (32, (0.2, 1.0), (0.75, 4 / 3)), (96, (0.08, 1.0), (0.5, 2.0))])
def test_required_short_side_is_the_smallest_that_fits(crop, area, aspect):
    n = required_short_side(crop, area, aspect)
    assert n % 2 == 0
    assert smallest_box_side(n, area, aspect) >= crop - 1e-9
    assert smallest_box_side(n - 2, area, aspect) < crop


def test_loader_fails_at_start_when_crops_would_upsample(synth_shards, tmp_path):
    cfg = Config()
    cfg.objectives.mcl.weight = 1.0
    cfg.data.crop_size = 112                          # from 112-pixel shards: an upsampling
    urls = sorted(str(p) for p in synth_shards.glob("*.tar"))
    assert shards_short_side(urls)[0] == 112
    with pytest.raises(ConfigError, match=r"--short-side 252") as e:
        from mohico.datasets.load.pipeline import build_loader
        build_loader(cfg, str(synth_shards))
    assert "data.crop_size" in str(e.value) and "manifest.json" in str(e.value)
    cfg.data.crop_size = 50                           # 112 * sqrt(0.2) = 50.09: fits
    check_crop_resolution(cfg.data, cfg.sampling, urls)
    # without a manifest the first sample's json gives the short side
    lone = tmp_path / "lone-000000.tar"
    shutil.copy(urls[0], lone)
    side, where = shards_short_side([str(lone)])
    assert side == 112 and where.startswith(str(lone))
    cfg.data.crop_size = 51
    with pytest.raises(ConfigError, match=r"--short-side 116"):
        check_crop_resolution(cfg.data, cfg.sampling, [str(lone)])


@pytest.fixture(scope="module")
def shards_at_fps(tmp_path_factory):
    """Two 4-second 30 fps synthetic videos written as shards at 15, 25 and 30 fps."""
    from mohico.datasets.write.shards import write_shards
    from mohico.datasets.synthetic.synth import synthesize

    root = tmp_path_factory.mktemp("fps")
    synthesize(root / "v", videos=2, seed=3, fps=30, size=(96, 72), duration=4.0, topics=2)
    out = {}
    for fps in (15, 25, 30):
        write_shards(root / "v", root / f"s{fps}", short_side=72, fps=fps, gop=16, workers=1, progress=False)
        out[fps] = root / f"s{fps}"
    return out


@pytest.mark.parametrize("reference_fps", [15.0, 0.0])
def test_loader_spans_the_same_seconds_on_shards_at_15_25_30_fps(shards_at_fps, reference_fps):
    """8 frames at stride 2 of 15 fps = 1.07 s whatever fps the shards were written at; with
    reference_fps 0 (strides in stored frames) the span shrinks with the shards' fps."""
    from mohico.datasets.load.pipeline import build_loader

    spans = {}
    for fps, shards in shards_at_fps.items():
        cfg = Config()
        cfg.objectives.mcl.weight = cfg.objectives.hico.weight = 1.0
        d = cfg.data
        d.batch_size, d.num_workers, d.clip_len, d.frame_stride, d.reference_fps = 2, 0, 8, 2, reference_fps
        d.crop_size, d.motion_size, d.shuffle_buffer = 24, 7, 2
        loader = build_loader(cfg, str(shards))
        got = []
        for _ in range(2):
            b = next(loader)
            assert b.clips.shape[-3:] == (8, 24, 24)
            got += [clip_seconds(fr, fps) for fr in b.frames.reshape(-1, 8).numpy()]
        loader.close()
        spans[fps] = got
    if reference_fps:
        for fps, got in spans.items():
            np.testing.assert_allclose(got, 8 * 2 / 15, rtol=0.05, err_msg=f"{fps} fps shards")
    else:                                               # the old meaning: 16 stored frames
        for fps, got in spans.items():
            np.testing.assert_allclose(got, 8 * 2 / fps, rtol=1e-9)


def test_low_fps_shards_are_resampled_by_frame_index_not_stretched(shards_at_fps):
    """8 frames at 30 fps (0.27 s) from 15 fps shards: stride 0.5, frames repeat, the span holds."""
    from mohico.datasets.load.pipeline import build_loader

    cfg = Config()
    cfg.objectives.mcl.weight = 1.0
    d = cfg.data
    d.batch_size, d.num_workers, d.clip_len, d.frame_stride, d.reference_fps = 2, 0, 8, 1, 30.0
    d.crop_size, d.motion_size, d.shuffle_buffer = 24, 7, 2
    b = next(build_loader(cfg, str(shards_at_fps[15])))
    fr = b.frames.reshape(-1, 8).numpy()
    np.testing.assert_array_equal(fr - fr[:, :1], np.tile([0, 1, 1, 2, 2, 3, 3, 4], (len(fr), 1)))
    want = fr[:, :1] / 15.0 + np.arange(8) / 30.0        # the wanted times: every frame is the nearest
    assert np.abs(fr / 15.0 - want).max() <= 0.5 / 15 + 1e-9
    clips = b.clips                                   # (B, V, 3, T, S, S): repeated frames decode alike
    assert torch.equal(clips[:, :, :, 1], clips[:, :, :, 2]) and torch.equal(clips[:, :, :, 5], clips[:, :, :, 6])
