"""Motion maps (MCL, docs/METHODS.md §1.1): optical flow -> motion boundaries -> pooled uint8 maps.

Per pair of consecutive grey frames ``(g_t, g_{t+1})``:

1. optical flow ``(u, v)`` with OpenCV: ``"dis"`` (default: DIS, MEDIUM preset), ``"dis-fast"``
   (DIS, FAST preset: ~4x faster, less agreement with TV-L1 on fast motion), ``"farneback"``, or
   ``"tvl1"`` (needs ``opencv-contrib-python``, the paper's estimator). benchmarks/motion_maps.py:
   DIS MEDIUM runs at >100x TV-L1's speed with crop-box IoU ~0.8 against it on real clips
   (benchmarks/RESULTS.md);
2. motion-boundary magnitude (paper Eq. 1)
   ``m = sqrt((du/dx)^2 + (du/dy)^2 + (dv/dx)^2 + (dv/dy)^2)`` with 3x3 Prewitt derivatives
   normalised to units of (pixels/frame) per pixel; a uniform flow field (camera pan) has zero
   derivatives, so camera translation cancels;
3. a ``border``-pixel frame is zeroed (flow at image borders is unreliable);
4. block mean over ``stride x stride`` cells: cell ``(i, j)`` is the mean of
   ``m[i*stride:(i+1)*stride, j*stride:(j+1)*stride]``; the grid is ``(H // stride, W // stride)``
   (the < stride leftover rows/columns at the bottom/right lie in the zeroed border).

Frame ``t`` gets the map of flow ``t -> t+1``; the last frame repeats the previous map, so N
frames give N maps (a single-frame video gets one zero map). T-motion ``tmotion[t]`` is the
spatial mean of the float pooled map ``t`` (so it equals ``maps_u8[t].mean() / 255 * scale`` up
to quantisation); S-motion of a clip is the temporal mean of its maps.

Shot cuts: flow across a hard cut is meaningless and its motion boundaries are 10-100x a normal
frame's, which would dominate the scale and draw MCL's temporal sampling to cuts. For each pair the
next frame is warped back by a DIS FAST flow (whatever the map's method, so all methods agree on cuts); if more than ``cut_fraction`` (0.35) of the interior pixels
still differ by more than 24 grey levels, the pair is a cut: frame ``t`` gets the previous frame's
map (like the last frame of a video) and ``t + 1`` is reported in ``cuts``. Measured: synthetic
cuts 30-81% of pixels, real cuts in bikes.mp4 49-83%; fast real motion up to 31% (a passing car),
handheld cockatoo.mp4 <= 23%, synthetic motion <= 7%. Weak cuts between similar shots can be
missed (they then stay as they were); ``cut_fraction=None`` turns detection off.

Quantisation (:func:`quantise`): one scale per video, the 99.9th percentile of its pooled values
(robust to a few outlier cells, e.g. flow failures at shot cuts), values above it saturate at 255;
``magnitude = uint8 / 255 * scale``. A video without motion gets scale 1.0 and all-zero maps.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mohico.errors import MohicoError, UsageError

FLOW_METHODS = ("dis", "dis-fast", "farneback", "tvl1")
SCALE_PERCENTILE = 99.9
CUT_FRACTION = 0.35       # a pair is a shot cut if this fraction of pixels is not explained by the flow
CUT_LEVEL = 24            # ... i.e. differs by more than this many grey levels after warping

_PREWITT_X = np.array([[-1.0, 0.0, 1.0]] * 3, dtype=np.float32) / 6.0   # d/dx, averaged over 3 rows
_PREWITT_Y = np.ascontiguousarray(_PREWITT_X.T)


def make_flow(method: str = "dis") -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A flow function ``flow(prev, cur) -> (H, W, 2) float32`` (u, v in pixels/frame) for uint8 grey frames."""
    import cv2

    if method in ("dis", "dis-fast"):
        preset = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM if method == "dis" else cv2.DISOPTICAL_FLOW_PRESET_FAST
        dis = cv2.DISOpticalFlow_create(preset)
        return lambda prev, cur: dis.calc(prev, cur, None)
    if method == "farneback":
        return lambda prev, cur: cv2.calcOpticalFlowFarneback(prev, cur, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    if method == "tvl1":
        if not hasattr(cv2, "optflow"):
            raise MohicoError(
                "flow 'tvl1' needs OpenCV's contrib modules (cv2.optflow), which opencv-python lacks: "
                "install opencv-contrib-python in place of opencv-python (they share the cv2 module, "
                "never install both in one venv), or use --flow dis")
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        return lambda prev, cur: tvl1.calc(prev, cur, None)
    raise UsageError(f"unknown flow method {method!r}: choose one of {', '.join(FLOW_METHODS)}")


def motion_boundaries(flow: np.ndarray, border: int = 8) -> np.ndarray:
    """Motion-boundary magnitude of ``flow: (H, W, 2)`` -> ``(H, W)`` float32, ``border`` px zeroed."""
    import cv2

    u = np.ascontiguousarray(flow[..., 0], dtype=np.float32)
    v = np.ascontiguousarray(flow[..., 1], dtype=np.float32)
    sq = np.zeros(u.shape, np.float32)
    for comp in (u, v):
        for k in (_PREWITT_X, _PREWITT_Y):
            d = cv2.filter2D(comp, cv2.CV_32F, k, borderType=cv2.BORDER_REPLICATE)
            sq += d * d
    m = np.sqrt(sq)
    if border > 0:
        m[:border] = 0
        m[-border:] = 0
        m[:, :border] = 0
        m[:, -border:] = 0
    return m


def pool(m: np.ndarray, stride: int = 8) -> np.ndarray:
    """Block mean of ``m: (H, W)`` over ``stride x stride`` cells -> ``(H // stride, W // stride)`` float32."""
    gh, gw = m.shape[0] // stride, m.shape[1] // stride
    if gh == 0 or gw == 0:
        raise ValueError(f"frame {m.shape} is smaller than one {stride}x{stride} motion cell")
    return m[: gh * stride, : gw * stride].reshape(gh, stride, gw, stride).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def grid_shape(height: int, width: int, stride: int = 8) -> tuple[int, int]:
    return height // stride, width // stride


class MotionMapper:
    """Streaming motion maps: :meth:`push` grey frames one at a time (only the previous frame is
    kept), then :meth:`finish` -> ``(maps (N, gh, gw) float32, tmotion (N,) float64)``.

    Memory: one full-resolution frame plus the pooled maps (``N * gh * gw`` floats: ~9 MB for a
    10-minute 15 fps video at 112x149).
    """

    def __init__(self, method: str = "dis", stride: int = 8, border: int = 8, cut_fraction: float | None = CUT_FRACTION):
        self.method, self.stride, self.border, self.cut_fraction = method, stride, border, cut_fraction
        self._flow = make_flow(method)
        # cuts are judged with one estimator whatever the method (DIS FAST: ~1 ms a frame), so every
        # method sees the same cuts; the method's own flow serves when it is that estimator
        self._cut_flow = None if method == "dis-fast" or cut_fraction is None else make_flow("dis-fast")
        self._prev: np.ndarray | None = None
        self._maps: list[np.ndarray] = []
        self._grid = None
        self._count = 0
        self.cuts: list[int] = []   # first frame of each detected new shot

    def _is_cut(self, prev: np.ndarray, cur: np.ndarray, flow: np.ndarray) -> bool:
        import cv2

        if self._grid is None:
            h, w = prev.shape
            self._grid = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        gx, gy = self._grid
        warped = cv2.remap(cur, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        b = self.border
        err = cv2.absdiff(prev, warped)[b:prev.shape[0] - b, b:prev.shape[1] - b]
        return err.size > 0 and np.count_nonzero(err > CUT_LEVEL) > self.cut_fraction * err.size

    def push(self, grey: np.ndarray) -> None:
        """Add frame ``grey: (H, W) uint8``."""
        grey = np.ascontiguousarray(grey, dtype=np.uint8)
        if self._prev is not None:
            if grey.shape != self._prev.shape:
                raise ValueError(f"frame size changed from {self._prev.shape} to {grey.shape}")
            flow = self._flow(self._prev, grey)
            cut_flow = flow if self._cut_flow is None else self._cut_flow(self._prev, grey)
            if self.cut_fraction is not None and self._is_cut(self._prev, grey, cut_flow):
                self.cuts.append(self._count)
                gh, gw = grid_shape(*grey.shape, self.stride)
                self._maps.append(self._maps[-1] if self._maps else np.zeros((gh, gw), np.float32))
            else:
                self._maps.append(pool(motion_boundaries(flow, self.border), self.stride))
        self._prev = grey
        self._count += 1

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self._count == 0:
            raise ValueError("no frames were pushed")
        if not self._maps:   # one frame: no flow, no motion
            gh, gw = grid_shape(*self._prev.shape, self.stride)
            self._maps.append(np.zeros((gh, gw), np.float32))
        else:
            self._maps.append(self._maps[-1])   # the last frame gets the previous flow
        maps = np.stack(self._maps)
        tmotion = maps.mean(axis=(1, 2), dtype=np.float64)
        return maps, tmotion


def quantise(maps: np.ndarray, percentile: float = SCALE_PERCENTILE) -> tuple[np.ndarray, float]:
    """Float maps -> ``(uint8 maps, scale)`` with ``magnitude ~= uint8 / 255 * scale``."""
    scale = float(np.percentile(maps, percentile)) if maps.size else 0.0
    if not scale > 0:
        scale = float(maps.max()) if maps.size else 0.0
    if not scale > 0:
        return np.zeros(maps.shape, np.uint8), 1.0
    q = np.clip(np.rint(maps * (255.0 / scale)), 0, 255).astype(np.uint8)
    return q, scale


def dequantise(maps_u8: np.ndarray, scale: float) -> np.ndarray:
    """uint8 maps -> float32 magnitudes."""
    return maps_u8.astype(np.float32) * np.float32(scale / 255.0)


def motion_maps(frames, method: str = "dis", stride: int = 8, border: int = 8,
                cut_fraction: float | None = CUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Convenience: float maps and T-motion for an iterable of grey uint8 frames."""
    mm = MotionMapper(method, stride, border, cut_fraction)
    for g in frames:
        mm.push(g)
    return mm.finish()
