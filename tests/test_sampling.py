"""Sampling constraints over many draws (pure numpy, independent checks)."""
from __future__ import annotations

import numpy as np
import pytest

from mohico.config import Config
from mohico.datasets import sampling as S


def rng(i=0):
    return np.random.default_rng(i)


def test_gradual_delta_and_stable_rng():
    assert S.gradual_delta(0.0, 2.0) == 0.0
    assert S.gradual_delta(0.25, 2.0) == 0.5
    assert S.gradual_delta(1.7, 2.0) == 2.0 and S.gradual_delta(-1, 2.0) == 0.0
    a = S.sample_rng(1, 2, 0, "video_00001").random(5)
    b = S.sample_rng(1, 2, 0, "video_00001").random(5)
    c = S.sample_rng(1, 3, 0, "video_00001").random(5)
    d = S.sample_rng(1, 2, 0, "video_00002").random(5)
    assert np.array_equal(a, b) and not np.allclose(a, c) and not np.allclose(a, d)
    assert S.stable_hash("abc") == S.stable_hash("abc") != S.stable_hash("abd")


@pytest.mark.parametrize("dmax", [0.0, 0.3, 1.0, 5.0])
def test_hico_distance_bounds_and_inside(dmax):
    T, stride, fps = 8, 2, 15.0
    span = S.clip_span(T, stride)
    r = rng(1)
    dists = []
    for trial in range(400):
        n = int(r.integers(span, 400))
        st = S.hico_starts(n, fps, T, stride, dmax, r)
        assert st.min() >= 0 and (st + span - 1).max() <= n - 1       # wholly inside
        ci, cj = (st[:2] + (span - 1) / 2) / fps
        d = abs(ci - cj)
        assert d < dmax or (dmax == 0 and d == 0)
        dists.append(d)
    if dmax >= 1.0:
        assert max(dists) > 0.5 * dmax                                 # the window is used


def test_hico_far_gap():
    r = rng(2)
    for _ in range(300):
        st = S.hico_starts(300, 15.0, 8, 2, 0.5, r, far_min_gap=5.0)
        assert abs(st[2] - st[0]) / 15.0 >= 5.0
    # too short for the gap: the farthest start
    st = S.hico_starts(40, 15.0, 8, 2, 0.5, r, far_min_gap=100.0)
    assert abs(st[2] - st[0]) == max(st[0], 40 - 15 - st[0])


def test_clip_scores_against_loop():
    tm = rng(3).random(50)
    sc = S.clip_scores(tm, 4, 3)
    ref = [np.mean([tm[s + 3 * t] for t in range(4)]) for s in range(50 - 9 - 1 + 1)]
    np.testing.assert_allclose(sc, ref)


def test_mcl_median_rule():
    r = rng(4)
    tm = np.concatenate([np.zeros(100), np.ones(100), np.zeros(100)]) + 0.01 * r.random(300)
    sc = S.clip_scores(tm, 8, 2)
    med = np.median(sc)
    uniform_hits, nf = 0, 0
    for _ in range(2000):
        st, focused = S.mcl_starts(tm, 8, 2, r, p=0.7)
        if focused:
            nf += 1
            assert (sc[st] >= med).all()
            assert len(S.high_motion_starts(sc)) >= len(sc) // 2
        else:
            uniform_hits += (sc[st] < med).sum()
    assert abs(nf / 2000 - 0.7) < 0.04
    assert uniform_hits > 0                               # the uniform branch reaches low clips


def blob_map(h=28, w=28, box=(16, 4, 7, 6), noise=0.02, seed=0):
    m = noise * np.random.default_rng(seed).random((h, w))
    x, y, bw, bh = box
    m[y:y + bh, x:x + bw] += 1.0
    return m


def test_motion_crop_box_coverage_and_focus():
    r = rng(5)
    for trial in range(200):
        if trial % 2:   # small blob on a flat background
            gt = (int(r.integers(0, 20)), int(r.integers(0, 20)), int(r.integers(3, 9)), int(r.integers(3, 9)))
            m = blob_map(box=gt, noise=0.0)
        else:           # blob larger than 10% of the map on a noisy background
            gt = (int(r.integers(0, 14)), int(r.integers(0, 14)), int(r.integers(9, 14)), int(r.integers(9, 14)))
            m = blob_map(box=gt, seed=trial)
        box, method = S.motion_crop_box(m, 90, 0.8, r)
        x, y, w, h = box
        assert method == "motion"
        assert x >= 0 and y >= 0 and x + w <= 28 + 1e-9 and y + h <= 28 + 1e-9
        hot = S.hot_mask(m, 90)
        # independent coverage: supersample the hot cells
        up = np.kron(hot, np.ones((8, 8), bool))
        yy, xx = (np.mgrid[0:28 * 8, 0:28 * 8] + 0.5) / 8
        inside = (xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)
        assert (up & inside).sum() / up.sum() >= 0.8 - 0.02
        assert w * h < 28 * 28 * 0.999                    # never the whole frame


def test_motion_crop_box_fallback():
    box, method = S.motion_crop_box(np.zeros((14, 14)), rng=rng(6))
    assert method == "random"
    x, y, w, h = box
    assert 0 <= x and x + w <= 14 + 1e-9 and 0.2 * 196 - 1e-6 <= w * h <= 196 + 1e-6
    # hot cells in the four corners: no box under the area cap reaches 0.95 coverage
    m = np.zeros((14, 14)); m[0, 0] = m[0, 13] = m[13, 0] = m[13, 13] = 1
    _, method = S.motion_crop_box(m, 90, 0.95, rng(7), area=(0.2, 0.5))
    assert method == "random"


def test_crop_resize_maps_identity_flip_and_reference():
    maps = np.random.default_rng(8).random((3, 10, 12)).astype(np.float32)
    np.testing.assert_allclose(S.crop_resize_maps(maps, (0, 0, 12, 10), (10, 12)), maps, atol=1e-6)
    a = S.crop_resize_maps(maps, (2.0, 1.0, 6.0, 6.0), (3, 3))
    b = S.crop_resize_maps(maps, (2.0, 1.0, 6.0, 6.0), (3, 3), flip=True)
    np.testing.assert_array_equal(a[:, :, ::-1], b)
    # an integer 2x downscale of a box = the mean of the 2x2 blocks at their centres
    np.testing.assert_allclose(a[:, 0, 0], maps[:, 1:3, 2:4].mean(axis=(1, 2)), atol=1e-6)


def meta_with_shots(n=300, fps=15.0, w=160, h=120, gh=15, gw=20):
    """Static first/last thirds, a moving blob in the middle third."""
    tm = np.zeros(n)
    tm[n // 3: 2 * n // 3] = 1.0
    motion = np.zeros((n, gh, gw), np.uint8)
    motion[n // 3: 2 * n // 3, 5:9, 12:17] = 200
    meta = {"num_frames": n, "fps": fps, "width": w, "height": h, "tmotion": tm.tolist(),
            "motion": {"scale": 1.0, "grid": [gh, gw], "stride": 8}}
    return meta, motion


@pytest.mark.parametrize("hico", [False, True])
def test_clip_sampler_views(hico):
    cfg = Config()
    cfg.data.clip_len, cfg.data.frame_stride, cfg.data.motion_size = 8, 2, 7
    cs = S.ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=hico)
    cs.set_progress(0.5)
    meta, motion = meta_with_shots()
    high = 0
    for i in range(200):
        d = cs.sample(meta, motion, S.sample_rng(0, 0, 0, f"k{i}"))
        V = 3 if hico else 2
        assert d.frames.shape == (V, 8) and d.motion.shape == (V, 8, 7, 7) and d.boxes.shape == (V, 4)
        assert (d.frames >= 0).all() and (d.frames < 300).all()
        x, y, w, h = d.boxes.T
        assert (x >= 0).all() and (y >= 0).all() and (x + w <= 160).all() and (y + h <= 120).all()
        if hico:
            assert abs(d.starts[0] - d.starts[1]) / 15.0 < 0.5 or d.starts[0] == d.starts[1]
        high += ((d.frames[:2, -1] >= 100) & (d.frames[:2, 0] < 200)).sum()   # overlaps the moving shot
        for v in range(V):                      # the motion target of a flipped view is mirrored
            ref = S.crop_resize_maps(motion[d.frames[v]].astype(np.float32) / 255.0,
                                     d.map_boxes[v], (7, 7), d.augment[v]["flip"])
            np.testing.assert_allclose(d.motion[v], ref, atol=1e-6)
    # uniform sampling overlaps the moving shot with p ~ 0.45; focused sampling ~ 0.84
    assert high / 400 > 0.7


def test_sampler_deterministic():
    cfg = Config()
    cs = S.ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=True)
    meta, motion = meta_with_shots()
    a = cs.sample(meta, motion, S.sample_rng(3, 1, 0, "x"))
    b = cs.sample(meta, motion, S.sample_rng(3, 1, 0, "x"))
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.boxes, b.boxes)
    assert a.augment == b.augment and np.array_equal(a.motion, b.motion)
