"""Motion maps (docs/METHODS.md §1.1): motion boundaries against analytic flows and a float64 reference,
pooling, quantisation, and the two geometric facts on clips with known motion — a pure camera pan
gives near-zero interior motion boundaries, an object moving over a static background gives a peak
around the object's box."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from _videos import object_box, object_frames, pan_frames
from mohico.datasets.write import motion as M
from mohico.errors import MohicoError


def grey(frames):
    return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]


def reference_boundaries(flow, border):
    """float64 numpy reference: Prewitt derivatives written out with edge replication."""
    out = np.zeros(flow.shape[:2])
    for c in range(2):
        f = np.pad(flow[..., c].astype(np.float64), 1, mode="edge")
        dx = sum(f[1 + dy:f.shape[0] - 1 + dy, 2:] - f[1 + dy:f.shape[0] - 1 + dy, :-2] for dy in (-1, 0, 1)) / 6
        dy_ = sum(f[2:, 1 + d:f.shape[1] - 1 + d] - f[:-2, 1 + d:f.shape[1] - 1 + d] for d in (-1, 0, 1)) / 6
        out += dx ** 2 + dy_ ** 2
    out = np.sqrt(out)
    out[:border], out[-border:], out[:, :border], out[:, -border:] = 0, 0, 0, 0
    return out


def test_boundaries_match_reference_and_analytic_flows():
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(40, 56, 2)).astype(np.float32)
    np.testing.assert_allclose(M.motion_boundaries(flow, 4), reference_boundaries(flow, 4), rtol=1e-5, atol=1e-5)
    yy, xx = np.mgrid[0:40, 0:56].astype(np.float32)
    # uniform translation (camera pan): zero everywhere
    assert np.abs(M.motion_boundaries(np.dstack([np.full_like(xx, 3.0), np.full_like(xx, -2.0)]), 2)).max() < 1e-6
    # linear shear u = 0.1 x, v = -0.2 y: |grad u| = 0.1, |grad v| = 0.2 -> sqrt(0.05) in the interior
    m = M.motion_boundaries(np.dstack([0.1 * xx, -0.2 * yy]), 2)
    np.testing.assert_allclose(m[2:-2, 2:-2], np.sqrt(0.05), rtol=1e-5)
    assert (m[:2] == 0).all() and (m[:, -2:] == 0).all()


def test_pool_is_block_mean():
    m = np.random.default_rng(1).random((37, 45)).astype(np.float32)
    p = M.pool(m, 8)
    assert p.shape == (4, 5)
    ref = np.array([[m[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8].mean() for j in range(5)] for i in range(4)])
    np.testing.assert_allclose(p, ref, rtol=1e-6)


def test_quantise_roundtrip_and_scale():
    rng = np.random.default_rng(2)
    maps = rng.gamma(2.0, 0.1, size=(50, 7, 9)).astype(np.float32)
    q, scale = M.quantise(maps)
    assert q.dtype == np.uint8 and scale == pytest.approx(np.percentile(maps, 99.9))
    back = M.dequantise(q, scale)
    inside = maps <= scale
    assert np.abs(back - maps)[inside].max() <= scale / 255 / 2 + 1e-6
    assert (q[~inside] == 255).all()
    z, s0 = M.quantise(np.zeros((3, 2, 2), np.float32))
    assert s0 == 1.0 and not z.any()


def test_n_maps_for_n_frames_last_repeats():
    frames = grey(object_frames(6))
    maps, tm = M.motion_maps(frames)
    assert maps.shape == (6, 120 // 8, 160 // 8) and tm.shape == (6,)
    np.testing.assert_array_equal(maps[-1], maps[-2])
    np.testing.assert_allclose(tm, maps.mean(axis=(1, 2)))
    one, tm1 = M.motion_maps(frames[:1])
    assert one.shape == (1, 15, 20) and not one.any() and tm1[0] == 0


@pytest.mark.parametrize("method", ["dis", "dis-fast", "farneback"])
def test_pan_cancels_object_peaks(method):
    n = 12
    pan_maps, _ = M.motion_maps(grey(pan_frames(n, speed=(3, 1))), method)
    obj_maps, _ = M.motion_maps(grey(object_frames(n, speed=(3, 0))), method)
    interior = (slice(None), slice(2, -2), slice(2, -2))
    # the flow itself is large for the pan (~3.2 px/frame) ...
    flow = M.make_flow(method)(*grey(pan_frames(2, speed=(3, 1))))
    assert np.median(np.hypot(flow[..., 0], flow[..., 1])[16:-16, 16:-16]) > 2.5
    # ... but its motion boundaries are near zero, far below the moving object's
    obj_peak = obj_maps.max(axis=(1, 2)).mean()
    assert pan_maps[interior].mean() < 0.05 * obj_peak, (pan_maps[interior].mean(), obj_peak)
    # the object's peak lies on its box (one cell of slack), and most motion lies around it
    # (two cells of slack: DIS's 8-px patches spread the boundary; the region is ~20% of the grid)
    for t in range(n - 1):
        x, y, w, h = object_box(t, speed=(3, 0))
        cells = [x // 8, y // 8, (x + w + 3) // 8, (y + h) // 8]   # flow t -> t+1 spans x .. x+w+3
        i, j = np.unravel_index(obj_maps[t].argmax(), obj_maps[t].shape)
        assert cells[1] - 1 <= i <= cells[3] + 1 and cells[0] - 1 <= j <= cells[2] + 1, (t, (i, j), cells)
        x0, y0, x1, y1 = max(cells[0] - 2, 0), max(cells[1] - 2, 0), cells[2] + 2, cells[3] + 2
        assert obj_maps[t, y0:y1 + 1, x0:x1 + 1].sum() > 0.8 * obj_maps[t].sum()


def test_tvl1_without_contrib_names_the_package():
    if hasattr(cv2, "optflow"):
        f = M.make_flow("tvl1")
        assert f(*grey(pan_frames(2))).shape == (120, 160, 2)
    else:
        with pytest.raises(MohicoError, match="opencv-contrib-python"):
            M.make_flow("tvl1")
    with pytest.raises(MohicoError, match="dis, dis-fast, farneback, tvl1"):
        M.make_flow("raft")


def test_shot_cut_detected_and_bridged():
    a = grey(pan_frames(10, speed=(2, 1), seed=7))
    b = grey(object_frames(10, seed=11))
    mm = M.MotionMapper("dis")
    for g in a + b:
        mm.push(g)
    maps, tm = mm.finish()
    assert mm.cuts == [10]
    np.testing.assert_array_equal(maps[9], maps[8])          # the pair across the cut gets the previous map
    assert tm[9] < 3 * np.median(tm)
    raw, _ = M.motion_maps(a + b, cut_fraction=None)          # without detection the cut dominates
    assert raw[9].mean() > 5 * np.median(raw.mean(axis=(1, 2)))
    for clip in (a, b):                                        # no false cuts inside a shot
        mm = M.MotionMapper("dis")
        for g in clip:
            mm.push(g)
        assert mm.cuts == []
