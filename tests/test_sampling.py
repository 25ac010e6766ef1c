"""Sampling constraints over many draws (pure numpy, independent checks)."""
from __future__ import annotations

import numpy as np
import pytest

from mohico.config import Config
from mohico.datasets.load import crops as C
from mohico.datasets.load import sampling as S


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


def test_mcl_halves_rule_on_known_motion():
    """The official draw: query and key in different halves, never the same or overlapping clips,
    each among the top-ranked clips of its half when focused (checked against a brute-force rank)."""
    r = rng(6)
    T, stride = 8, 1
    span = S.clip_span(T, stride)
    # known motion: a burst in each half, at places that differ per trial
    halves_seen, focused_n = set(), 0
    for trial in range(600):
        n = int(r.integers(2 * span, 200))
        tm = 0.01 * r.random(n)
        for lo, hi in ((0, n // 2), (n // 2, n)):
            a = int(r.integers(lo, hi - 1))
            tm[a:a + int(r.integers(1, 12))] += 1.0
        got = S.mcl_half_starts(tm, T, stride, r, p=0.7, n_keys=2)
        assert got is not None
        (q, *keys), focused = got
        sc = S.clip_scores(tm, T, stride)
        mid = n // 2
        first = [s for s in range(len(sc)) if s + span <= mid]
        second = [s for s in range(len(sc)) if s >= mid]
        in_first = q in first
        assert in_first != (q in second)
        halves_seen.add(in_first)
        for k in keys:
            assert (k in second) if in_first else (k in first)
            assert abs(k - q) >= span                                 # never the query's clip, no overlap
        key_half = second if in_first else first
        key_pool = sorted(key_half, key=lambda s: (-sc[s], s))[:int(len(key_half) * 0.5) + 1] if focused else key_half
        if any(abs(s - keys[0]) >= span for s in key_pool):           # the keys do not overlap when they can
            assert abs(keys[0] - keys[1]) >= span
        if focused:
            focused_n += 1
            for start, half in ((q, first if in_first else second), *((k, key_half) for k in keys)):
                ranked = sorted(half, key=lambda s: (-sc[s], s))[:int(len(half) * 0.5) + 1]
                assert start in ranked
    assert halves_seen == {True, False}
    assert abs(focused_n / 600 - 0.7) < 0.06
    # too short for one clip per half: None (the caller falls back to the pool and counts it)
    assert S.mcl_half_starts(np.ones(2 * span - 1), T, stride, r) is None


def test_the_sampler_draws_halves_or_pool_and_counts_short_videos():
    cfg = Config()
    cfg.data.clip_len, cfg.data.frame_stride, cfg.data.reference_fps = 8, 1, 0
    meta = {"num_frames": 120, "fps": 15.0, "width": 64, "height": 64, "tmotion": list(np.linspace(0, 1, 120))}
    cfg.sampling.mcl_temporal = "halves"
    halves = S.ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=False)
    for i in range(200):
        st, _, _ = halves.temporal(meta, rng(i))
        assert (st[0] + 8 <= 60) != (st[0] >= 60) and (st[1] + 8 <= 60) != (st[1] >= 60)
        assert (st[0] < 60) != (st[1] < 60)
    assert halves.counts == {}
    halves.temporal({**meta, "num_frames": 15, "tmotion": [0.5] * 15}, rng(0))
    assert halves.counts == {"mcl_short_video": 1}
    cfg.sampling.mcl_temporal = "pool"
    pool = S.ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=False)
    same = sum(int(np.ptp(pool.temporal(meta, rng(i))[0]) < 8) for i in range(400))
    assert same > 0                                                   # the pool's key may overlap its query


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


def supersampled_coverage(hot, box, k=8):
    """Fraction of the hot cells' area inside ``box``, by supersampling each cell k x k."""
    H, W = hot.shape
    up = np.kron(hot, np.ones((k, k), bool))
    yy, xx = (np.mgrid[0:H * k, 0:W * k] + 0.5) / k
    x, y, w, h = box
    inside = (xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)
    return (up & inside).sum() / up.sum()


def exact_coverages(hot, boxes):
    """Hot-cell area inside each box / hot area, one hot cell at a time (float64 reference)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
    inside = np.zeros(len(boxes))
    cells = list(zip(*np.nonzero(hot)))
    for r, c in cells:
        ox = np.maximum(0.0, np.minimum(x1, c + 1.0) - np.maximum(x0, float(c)))
        oy = np.maximum(0.0, np.minimum(y1, r + 1.0) - np.maximum(y0, float(r)))
        inside += ox * oy
    return inside / len(cells)


def test_motion_crop_box_fallback():
    box, method = S.motion_crop_box(np.zeros((14, 14)), rng=rng(6))
    assert method == "random"
    x, y, w, h = box
    assert 0 <= x and x + w <= 14 + 1e-9 and 0.2 * 196 - 1e-6 <= w * h <= 196 + 1e-6
    # hot cells in the four corners: no box under the area cap reaches 0.95 coverage; the official
    # rule then takes the best-coverage box it saw (the first of equals), still a motion crop
    m = np.zeros((14, 14)); m[0, 0] = m[0, 13] = m[13, 0] = m[13, 13] = 1
    box, method = S.motion_crop_box(m, 90, 0.95, rng(7), area=(0.2, 0.5))
    assert method == "motion"
    cands = S.motion_crop_candidates((14, 14), rng(7), area=(0.2, 0.5)).reshape(-1, 4)
    hot = S.hot_mask(m, 90)
    ref = exact_coverages(hot, cands)
    assert ref.max() < 0.95
    np.testing.assert_allclose(box, cands[np.flatnonzero(ref >= ref.max() - 1e-9)[0]])
    assert supersampled_coverage(hot, box) > 0.2                  # most of a corner cell


def test_motion_crop_box_takes_the_first_drawn_box_that_covers():
    """Official rule: candidates in the order drawn (not smallest first), the first that covers."""
    r = rng(9)
    for trial in range(40):
        gt = (int(r.integers(0, 20)), int(r.integers(0, 20)), int(r.integers(3, 9)), int(r.integers(3, 9)))
        m = blob_map(box=gt, seed=trial)
        seed = 100 + trial
        box, method = S.motion_crop_box(m, 90, 0.8, rng(seed))
        cands = S.motion_crop_candidates(m.shape, rng(seed)).reshape(-1, 4)
        hot = S.hot_mask(m, 90)
        ref = exact_coverages(hot, cands)
        assert method == "motion" and (ref >= 0.8).any()
        np.testing.assert_allclose(box, cands[np.flatnonzero(ref >= 0.8 - 1e-9)[0]])


# ---------------------------------------------------------------- MCL's crop, the official rule
def grid_map(cells, value=1.0, n=7, k=2, noise=0.0, seed=0):
    """An ``(n k) x (n k)`` S-motion map: ``value`` on the given cells of the n x n grid (each k x k map
    cells), ``noise`` x U(0, 1) elsewhere."""
    m = noise * np.random.default_rng(seed).random((n * k, n * k))
    for r, c in cells:
        m[r * k:(r + 1) * k, c * k:(c + 1) * k] = value
    return m


def replay_official(shape, seed, area=(0.2, 1.0), aspect=(3 / 4, 4 / 3), sizes=20, positions=40):
    """The official rule's candidate boxes, replayed from the seed: the first drawn size that fits
    (the whole map allowed) and its positions, in the order tried (None: no size fits)."""
    H, W = shape
    r = rng(seed)
    a = r.uniform(area[0], area[1], size=sizes) * H * W
    ar = np.exp(r.uniform(np.log(aspect[0]), np.log(aspect[1]), size=sizes))
    for w, h in zip(np.sqrt(a * ar), np.sqrt(a / ar)):
        if w <= W + 1e-9 and h <= H + 1e-9:
            w, h = min(w, W), min(h, H)
            xy = r.random((positions, 2)) * np.array([W - w, H - h])
            return [(x, y, w, h) for x, y in xy]
    return None


def area_inside(target, box):
    """Fraction of ``target``'s area inside ``box`` (two rectangles: the overlap's width x height)."""
    tx, ty, tw, th = target
    x, y, w, h = box
    ow = max(0.0, min(tx + tw, x + w) - max(tx, x))
    oh = max(0.0, min(ty + th, y + h) - max(ty, y))
    return ow * oh / (tw * th)


def test_pool_grid_is_the_area_mean():
    m = rng(1).random((14, 14))
    np.testing.assert_allclose(C.pool_grid(m), m.reshape(7, 2, 7, 2).mean(axis=(1, 3)), atol=1e-12)
    # 10 x 12 cells onto 7 x 7: each map cell split in 7 x 7 pieces, then 10 x 12 blocks of pieces
    m = rng(2).random((10, 12))
    up = np.kron(m, np.ones((7, 7)))
    np.testing.assert_allclose(C.pool_grid(m), up.reshape(7, 10, 7, 12).mean(axis=(1, 3)), atol=1e-12)
    np.testing.assert_allclose(C.pool_grid(np.full((3, 4), 2.5)), np.full((7, 7), 2.5))   # coarser than the grid


@pytest.mark.parametrize("cells,box,need", [
    ([(0, 0), (0, 1), (1, 0), (1, 1)], (0, 0, 2, 2), 0.9),          # 4 cells: a 2 x 2 box
    ([(6, 6), (6, 5), (5, 6), (4, 6)], (5, 4, 2, 3), 0.8),          # bottom-right corner, 2 x 3 = 6 cells
    ([(3, 1), (3, 4), (5, 2), (4, 3)], (1, 3, 4, 3), 0.7),          # 4 x 3 = 12 cells
    ([(0, 0), (0, 6), (6, 0), (6, 6)], (0, 0, 7, 7), 0.0),          # the four corners: 49 cells
    ([(2, 0), (2, 1), (2, 5), (2, 6)], (0, 2, 7, 1), 0.8),          # a 7 x 1 row: 7 cells
])
def test_top_cell_box_and_the_coverage_it_needs(cells, box, need):
    grid = 0.01 * rng(3).random((7, 7))
    for i, (r, c) in enumerate(cells):
        grid[r, c] = 1.0 + 0.1 * i
    got, want = C.top_cell_box(grid)
    assert got == box and want == need


def test_top_cell_box_ties_take_the_later_cells_first():
    """As ``np.argsort(...)[::-1]`` in the official code: on a flat grid, the last 4 cells."""
    assert C.top_cell_box(np.ones((7, 7))) == ((3.0, 6.0, 4.0, 1.0), 0.9)


def test_rect_coverage_is_the_target_area_inside():
    r = rng(4)
    target = (3.0, 2.0, 4.0, 6.0)
    boxes = np.column_stack([r.uniform(0, 8, (50, 2)), r.uniform(0.5, 8, (50, 2))])
    ref = [area_inside(target, b) for b in boxes]
    np.testing.assert_allclose(C.rect_coverage(target, boxes), ref, atol=1e-12)
    # and against a supersampled count of the target's area (k x k points)
    k = 400
    yy, xx = (np.mgrid[0:k, 0:k] + 0.5) / k
    xx, yy = 3.0 + 4.0 * xx, 2.0 + 6.0 * yy
    for b, want in zip(boxes[:10], C.rect_coverage(target, boxes[:10])):
        x, y, w, h = b
        assert abs(((xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)).mean() - want) < 0.006


@pytest.mark.parametrize("corner", [(0, 0), (5, 5), (0, 5)])
def test_official_crop_covers_a_corner_block_at_0_9(corner):
    """Motion in a 2 x 2 block of grid cells in a corner: the box to cover is that block, at 0.9.
    The crop taken is the first replayed position that covers 0.9 of it, else the best position."""
    r0, c0 = corner
    cells = [(r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)]
    m = grid_map(cells, noise=0.05, seed=r0 + c0)
    target = (2.0 * c0, 2.0 * r0, 4.0, 4.0)             # 2 map cells per grid cell
    taken, first = [], []
    for seed in range(60):
        box, method = C.official_crop_box(m, rng(seed))
        cands = replay_official(m.shape, seed)
        cov = np.array([area_inside(target, c) for c in cands])
        assert method == "motion"
        want = int(np.flatnonzero(cov >= 0.9)[0]) if (cov >= 0.9).any() else int(np.argmax(cov))
        np.testing.assert_allclose(box, cands[want], atol=1e-9)
        x, y, w, h = box
        assert x >= -1e-9 and y >= -1e-9 and x + w <= 14 + 1e-9 and y + h <= 14 + 1e-9
        taken.append(area_inside(target, box))
        first.append(cov[0])                            # a plain random position of the same size
    taken, first = np.array(taken), np.array(first)
    assert (taken >= 0.9).mean() >= 0.25 and taken.mean() > first.mean() + 0.3, (taken.mean(), first.mean())


def test_official_crop_motion_over_more_than_12_cells_is_a_plain_random_crop():
    m = grid_map([(0, 0), (0, 6), (6, 0), (6, 6)], noise=0.05)
    for seed in range(20):
        box, method = C.official_crop_box(m, rng(seed))
        assert method == "random"
        np.testing.assert_allclose(box, S.random_resized_crop(14, 14, rng(seed), attempts=20))
    assert C.official_crop_box(np.zeros((14, 14)), rng(0))[1] == "random"      # a flat map: no motion


def test_official_crop_allows_the_full_frame():
    """A size of the whole map is a candidate (the percentile rule never takes the whole frame)."""
    m = grid_map([(3, 3), (3, 4), (4, 3), (4, 4)], noise=0.05)
    box, method = C.official_crop_box(m, rng(0), area=(1.0, 1.0), aspect=(1.0, 1.0))
    assert method == "motion"
    np.testing.assert_allclose(box, (0.0, 0.0, 14.0, 14.0), atol=1e-9)
    assert S.motion_crop_box(m, 90, 0.8, rng(0), area=(1.0, 1.0), aspect=(1.0, 1.0))[1] == "random"


def test_official_crop_when_no_size_fits_spans_the_motion_box_from_a_corner():
    """No drawn size fits (aspect 2 at the full area on a square map): the official
    ``crop_from_corners``, a box inside the map that holds the whole top-cell box."""
    m = grid_map([(2, 3), (2, 4), (3, 3), (3, 4)], noise=0.05)
    target = (6.0, 4.0, 4.0, 4.0)
    for seed in range(30):
        (x, y, w, h), method = C.official_crop_box(m, rng(seed), area=(0.9, 1.0), aspect=(2.0, 2.0))
        assert method == "motion"
        assert x >= 0 and y >= 0 and x + w <= 14 + 1e-9 and y + h <= 14 + 1e-9
        assert area_inside(target, (x, y, w, h)) == 1.0


def test_official_crop_is_deterministic_with_a_seeded_rng():
    m = blob_map(box=(3, 15, 6, 5), seed=1)
    a = [C.official_crop_box(m, rng(s)) for s in range(10)]
    b = [C.official_crop_box(m, rng(s)) for s in range(10)]
    assert a == b and len({x[0] for x in a}) == 10


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic (numpy)."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, x, side="right") / len(a) - np.searchsorted(b, x, side="right") / len(b)).max()


@pytest.mark.parametrize("area", [(0.2, 1.0), (0.324, 0.576)])
def test_motion_crop_box_keeps_the_random_scale(area):
    """Where every candidate covers the hot cells, the crop area follows the configured draw:
    area ~ U(area) restricted to sizes that fit the map (reference: an independent rejection draw)."""
    H = W = 28
    m = np.zeros((H, W)); m[::3, ::3] = 1.0                  # hot cells everywhere (11% density)
    got = []
    for i in range(700):
        (x, y, w, h), method = S.motion_crop_box(m, 90, 0.01, rng(10_000 + i), area=area)
        assert method == "motion"
        assert x >= 0 and y >= 0 and x + w <= W + 1e-9 and y + h <= H + 1e-9
        got.append(w * h / (H * W))
    got = np.array(got)
    assert got.min() >= area[0] - 1e-9 and got.max() <= area[1] + 1e-9
    r = rng(1)                                                # reference: draw, keep the sizes that fit
    a = r.uniform(area[0], area[1], 20000)
    ar = np.exp(r.uniform(np.log(3 / 4), np.log(4 / 3), 20000))
    fits = (np.sqrt(a * ar) <= 1) & (np.sqrt(a / ar) <= 1)
    ref = a[fits]
    assert ks_statistic(got, ref) < 1.95 * np.sqrt(1 / len(got) + 1 / len(ref))   # alpha = 0.001
    assert abs(np.median(got) - np.median(ref)) < 0.05


def test_motion_crop_box_median_area_on_blob_maps():
    """On blob maps the boxes spread over the range (the old smallest-first rule gave a median
    area of ~0.25 on these maps, near the 0.2 floor; benchmarks/crop_area.py)."""
    r = rng(11)
    areas = []
    for trial in range(150):
        gt = (int(r.integers(0, 20)), int(r.integers(0, 20)), int(r.integers(3, 9)), int(r.integers(3, 9)))
        box, _ = S.motion_crop_box(blob_map(box=gt, seed=trial), 90, 0.8, r)
        areas.append(box[2] * box[3] / 28 ** 2)
    assert np.median(areas) > 0.45 and np.mean(np.array(areas) < 0.25) < 0.15


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
    cfg.sampling.mcl_temporal = "pool"     # the median rule over the whole video (halves: its own test)
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


# --------------------------------------------------------------------------- shot cuts
def spans_cut(frames, cuts) -> bool:
    """A clip holds frames of two shots: some cut c with first frame < c <= last frame."""
    return any(frames[0] < c <= frames[-1] for c in cuts)


@pytest.mark.parametrize("mcl,hico", [(True, False), (False, True), (True, True)])
def test_sampler_avoids_shot_cuts(mcl, hico):
    """Ground truth cuts at known frames: with avoid_cuts no view spans one while clean clips
    exist; without it, some do; every clean stretch long enough is still reached."""
    cfg = Config()
    cfg.data.clip_len, cfg.data.frame_stride, cfg.data.motion_size = 8, 2, 7
    meta, motion = meta_with_shots(n=300)
    cuts = [40, 47, 130, 210, 260]                      # shots: [0,40) [40,47) [47,130) [130,210) [210,260) [260,300)
    meta["cuts"] = cuts
    span = S.clip_span(8, 2)
    clean = [s for s in range(300 - span + 1) if not spans_cut(np.arange(s, s + span), cuts)]
    on = S.ClipSampler(cfg.sampling, cfg.data, mcl=mcl, hico=hico)
    cfg_off = Config(); cfg_off.data = cfg.data; cfg_off.sampling.avoid_cuts = False
    off = S.ClipSampler(cfg_off.sampling, cfg.data, mcl=mcl, hico=hico)
    on.set_progress(1.0); off.set_progress(1.0)
    spanned_off, starts_on = 0, set()
    for i in range(300):
        d = on.sample(meta, motion, S.sample_rng(0, 0, 0, f"v{i}"))
        for fr in d.frames:
            assert not spans_cut(fr, cuts), (fr, cuts)
        starts_on.update(int(s) for s in d.starts)
        if hico:                                        # HiCo's window still holds
            assert abs(d.starts[0] - d.starts[1]) / 15.0 < 1.0 or d.starts[0] == d.starts[1]
        spanned_off += sum(spans_cut(fr, cuts) for fr in off.sample(meta, motion, S.sample_rng(0, 0, 0, f"v{i}")).frames)
    assert spanned_off > 0
    assert starts_on <= set(clean)
    for lo, hi in [(0, 40), (47, 130), (130, 210), (210, 260), (260, 300)]:   # each shot that holds a clip
        assert any(lo <= s and s + span <= hi for s in starts_on), (lo, hi)


def test_cut_free_starts_reference_and_fallback():
    cuts = [5, 17, 18, 60]
    for stride in (1, 2, 2.5, 0.5):
        span = S.clip_span(6, stride)
        ref = [s for s in range(100 - span + 1) if not any(s < c <= s + span - 1 for c in cuts)]
        assert S.cut_free_starts(100, 6, stride, cuts).tolist() == ref
    # a cut every 3 frames: no clean clip, every valid start stays allowed
    cfg = Config()
    cfg.data.clip_len, cfg.data.frame_stride = 8, 2
    meta = {"num_frames": 60, "fps": 15.0, "width": 32, "height": 32, "cuts": list(range(3, 60, 3))}
    cs = S.ClipSampler(cfg.sampling, cfg.data, mcl=False, hico=True)
    assert cs.candidates(meta) is None
    d = cs.sample(meta, None, rng(3))
    assert (d.frames < 60).all() and d.frames.shape == (3, 8)


@pytest.mark.parametrize("rule", ["official", "percentile"])
def test_clip_sampler_crops_by_the_configured_rule(rule):
    """``sampling.crop_rule`` picks the box function; the sampled pixel boxes are its map boxes in
    pixels, and they hold the moving blob (rows 5-8, columns 12-16 of the 15 x 20 grid)."""
    cfg = Config()
    cfg.data.clip_len, cfg.data.frame_stride, cfg.data.motion_size = 8, 2, 7
    cfg.sampling.crop_rule = rule
    cs = S.ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=False)
    meta, motion = meta_with_shots()
    m = motion[120].astype(np.float64)
    area, aspect = cfg.sampling.crop_area, cfg.sampling.crop_aspect
    ref = ((lambda s, r: C.official_crop_box(s, r, area, aspect)) if rule == "official"
           else (lambda s, r: S.motion_crop_box(s, 90, 0.8, r, area, aspect)))
    for seed in range(5):
        assert cs.motion_crop(m, rng(seed)) == ref(m, rng(seed))
    blob = (12 * 8, 5 * 8, 5 * 8, 4 * 8)                   # in pixels (8-pixel cells)
    inside = []
    for i in range(100):
        d = cs.sample(meta, motion, S.sample_rng(0, 0, 0, f"r{i}"))
        for v in range(2):
            if d.crop_methods[v] == "motion" and d.frames[v].min() >= 100 and d.frames[v].max() < 200:
                inside.append(area_inside(blob, d.boxes[v]))
    assert len(inside) >= 50 and np.mean(inside) > 0.8, (len(inside), np.mean(inside))
