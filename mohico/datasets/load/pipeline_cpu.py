"""The clip transform in numpy/OpenCV: the PyAV path's twin of the DALI graph.

Used for codecs the local DALI backend cannot decode (H.264 without a GPU) and as an independent
reference in tests. Per clip, with one augmentation draw shared by its frames
(:func:`mohico.datasets.load.sampling.draw_augment`):

    crop box -> resize to (S, S) -> colour twist (brightness, contrast, saturation, hue;
    greyscale = saturation 0) -> Gaussian blur -> horizontal flip -> normalise -> (C, T, S, S)

The colour twist is DALI's ``fn.color_twist`` formula (YIQ hue rotation and saturation scale,
then ``brightness * (128 + contrast * (x - 128))``), the blur DALI's ``fn.gaussian_blur`` window
(``2 * ceil(3 * sigma) + 1``, reflect-101 borders), so both paths agree up to rounding and
resampling (DALI resizes with an antialiasing filter; OpenCV's area filter is used here when
shrinking).
"""
from __future__ import annotations

import math

import numpy as np

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def twist_matrix(saturation: float, hue_degrees: float) -> np.ndarray:
    """3x3 RGB matrix of DALI's hue rotation + saturation scale."""
    h = math.radians(hue_degrees)
    rot = np.array([[1, 0, 0], [0, math.cos(h), math.sin(h)], [0, -math.sin(h), math.cos(h)]])
    return _YIQ2RGB @ rot @ np.diag([1.0, saturation, saturation]) @ _RGB2YIQ


def color_twist(frames: np.ndarray, brightness: float, contrast: float, saturation: float,
                hue: float) -> np.ndarray:
    """frames: ``(T, H, W, 3)`` uint8 -> uint8, as DALI's ``fn.color_twist``."""
    m = twist_matrix(saturation, hue).astype(np.float32)
    x = frames.astype(np.float32) @ m.T
    x = brightness * (128.0 + contrast * (x - 128.0))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    k = 2 * math.ceil(3 * sigma) + 1
    return np.stack([cv2.GaussianBlur(f, (k, k), sigmaX=sigma, sigmaY=sigma,
                                      borderType=cv2.BORDER_REFLECT_101) for f in frames])


def crop_resize(frames: np.ndarray, box, size: int) -> np.ndarray:
    """frames ``(T, H, W, 3)`` uint8, box (x, y, w, h) whole pixels -> ``(T, size, size, 3)``."""
    import cv2

    x, y, w, h = (int(v) for v in box)
    crop = frames[:, y:y + h, x:x + w]
    interp = cv2.INTER_AREA if (w > size and h > size) else cv2.INTER_LINEAR
    return np.stack([cv2.resize(np.ascontiguousarray(f), (size, size), interpolation=interp)
                     for f in crop])


def transform_clip(frames: np.ndarray, box, aug: dict, size: int, mean, std) -> np.ndarray:
    """One decoded clip ``(T, H, W, 3)`` uint8 -> normalised ``(3, T, size, size)`` float32."""
    x = crop_resize(frames, box, size)
    sat = 0.0 if aug["grayscale"] else aug["saturation"]
    if (aug["brightness"], aug["contrast"], sat, aug["hue"]) != (1.0, 1.0, 1.0, 0.0):
        x = color_twist(x, aug["brightness"], aug["contrast"], sat, aug["hue"])
    if aug["blur_sigma"] > 0:
        x = gaussian_blur(x, aug["blur_sigma"])
    if aug["flip"]:
        x = x[:, :, ::-1]
    out = x.astype(np.float32) / 255.0
    out = (out - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(3, 0, 1, 2))
