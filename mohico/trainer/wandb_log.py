"""Weights & Biases logging from rank 0 that never stops training.

- Mode: ``wandb.mode=auto`` is online with an API key (``WANDB_API_KEY`` or a netrc entry for
  api.wandb.ai) and offline without one; the environment's ``WANDB_MODE`` (e.g. ``disabled``)
  wins over the config. Files go to ``run.dir/wandb/``.
- Resume: the run id lives in the checkpoint; a resumed run calls ``wandb.init(id=..., resume="allow")``
  and logs with explicit ``step=`` so the curves continue (offline runs make a new folder with
  the same id, merged by ``wandb sync``).
- Any W&B exception is caught: a warning is logged once and logging is switched off.
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("mohico.trainer")


def new_run_id() -> str:
    """An 8-character run id (W&B's own alphabet)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def resolve_mode(cfg_mode: str) -> str:
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("disabled", "offline", "online", "dryrun"):
        return "offline" if env == "dryrun" else env
    if cfg_mode != "auto":
        return cfg_mode
    return "online" if _have_api_key() else "offline"


def _have_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """Rank 0's W&B run. On other ranks, or when disabled or broken, every method is a no-op."""

    def __init__(self, cfg, run_dir: str | os.PathLike, run_id: str, rank: int, resumed: bool):
        self.run = None
        self.run_id = run_id
        self.mode = resolve_mode(cfg.wandb.mode)
        self._warned = False
        if rank != 0 or self.mode == "disabled":
            return
        try:
            import wandb
            from mohico.config import to_dict

            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None,
                                  name=cfg.run.name or Path(run_dir).resolve().name, id=run_id,
                                  resume="allow", dir=str(run_dir), mode=self.mode,
                                  config=to_dict(cfg), tags=list(cfg.wandb.tags) or None,
                                  settings=wandb.Settings(console="off", silent=True))
            log.info("W&B %s run %s (%s)%s", self.mode, run_id, self.run_dir or run_dir,
                     ", resumed" if resumed else "")
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            self._fail(e)

    @property
    def run_dir(self) -> str | None:
        try:
            return self.run.dir if self.run is not None else None
        except Exception:  # noqa: BLE001
            return None

    def _fail(self, e: Exception) -> None:
        if not self._warned:
            log.warning("W&B failed (%s: %s); training continues without W&B logging", type(e).__name__, e)
            self._warned = True
        self.run = None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def log_batch_images(self, batch: dict, step: int, mean, std, max_samples: int = 2) -> None:
        """A picture of the batch: per sample and view, the middle frame of the clip and its
        motion map, captioned with the crop box and frame indices."""
        if self.run is None:
            return
        try:
            import wandb

            img = batch_picture(batch, mean, std, max_samples)
            caption = "; ".join(
                f"{batch['key'][b] if 'key' in batch else b} view {v}: box "
                f"{[round(float(x), 1) for x in batch['boxes'][b, v]]} frames "
                f"{batch['frames'][b, v].tolist()[:1]}..{batch['frames'][b, v].tolist()[-1:]}"
                for b in range(min(max_samples, batch["clips"].shape[0]))
                for v in range(batch["clips"].shape[1]) if "boxes" in batch and "frames" in batch)
            self.run.log({"batch": wandb.Image(img, caption=caption[:1000])}, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def finish(self, exit_code: int = 0, timeout: float = 120.0) -> None:
        """Close the run; gives up (with a warning) after ``timeout`` s so a stuck W&B service
        cannot keep a finished job alive."""
        if self.run is None:
            return
        import threading

        run, self.run = self.run, None
        errors: list[Exception] = []

        def close():
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=close, name="wandb-finish", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            log.warning("W&B did not finish within %.0f s; leaving it (offline files may be incomplete)", timeout)
        elif errors:
            self.run = run
            self._fail(errors[0])


COLOURS = np.array([[0, 255, 0], [255, 64, 64], [64, 128, 255], [255, 255, 0]], dtype=np.uint8)


def _resize_nearest(img: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = np.minimum(np.arange(h) * img.shape[0] // max(h, 1), img.shape[0] - 1)
    xs = np.minimum(np.arange(w) * img.shape[1] // max(w, 1), img.shape[1] - 1)
    return img[ys][:, xs]


def _border(img: np.ndarray, y0: int, x0: int, y1: int, x1: int, colour) -> None:
    y1, x1 = min(y1, img.shape[0]) - 1, min(x1, img.shape[1]) - 1
    if y1 <= y0 or x1 <= x0:
        return
    img[y0, x0:x1 + 1] = colour
    img[y1, x0:x1 + 1] = colour
    img[y0:y1 + 1, x0] = colour
    img[y0:y1 + 1, x1] = colour


def batch_picture(batch: dict, mean, std, max_samples: int = 2, tile: int = 128) -> np.ndarray:
    """uint8 ``(rows * tile, (1 + 2V) * tile, 3)`` image, one row per sample: first the crop
    boxes of all views drawn in the stored frame (each view's middle frame pasted into its box,
    one colour per view), then per view its middle frame (de-normalised) and its motion map
    ("hot" colours), framed in the view's colour."""
    clips = batch["clips"].detach().float().cpu().numpy()          # (B, V, C, T, H, W)
    B, V, C, T, H, W = clips.shape
    motion = batch.get("motion")
    motion = motion.detach().float().cpu().numpy() if motion is not None else None   # (B, V, T, Hm, Wm)
    boxes = batch.get("boxes")
    boxes = boxes.detach().float().cpu().numpy() if boxes is not None else None     # (B, V, 4) x, y, w, h
    m = np.asarray(mean, dtype=np.float32).reshape(C, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(C, 1, 1)
    rows = []
    for b in range(min(B, max_samples)):
        frames = []
        for v in range(V):
            f = clips[b, v, :, T // 2] * s + m                         # (C, H, W) in [0, 1]
            frames.append((np.clip(f.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8))
        canvas = np.full((tile, tile, 3), 64, dtype=np.uint8)
        if boxes is not None:
            extent = max(float((boxes[b, :, 0] + boxes[b, :, 2]).max()), float((boxes[b, :, 1] + boxes[b, :, 3]).max()), 1.0)
            k = (tile - 1) / extent
            for v in range(V):
                x, y, w, h = (boxes[b, v] * k).round().astype(int)
                if w > 1 and h > 1:
                    canvas[y:y + h, x:x + w] = _resize_nearest(frames[v], h, w)[:tile - y, :tile - x]
            for v in range(V):
                x, y, w, h = (boxes[b, v] * k).round().astype(int)
                _border(canvas, y, x, y + h, x + w, COLOURS[v % len(COLOURS)])
        tiles = [canvas]
        for v in range(V):
            frame = _resize_nearest(frames[v], tile, tile).copy()
            _border(frame, 0, 0, tile, tile, COLOURS[v % len(COLOURS)])
            tiles.append(frame)
            heat = np.zeros((tile, tile, 3), dtype=np.uint8)
            if motion is not None:
                mm = motion[b, v, min(T // 2, motion.shape[2] - 1)]
                mm = mm / (mm.max() + 1e-8)
                up = _resize_nearest(mm, tile, tile)
                heat = (np.stack([up, up ** 2, up ** 4], axis=-1) * 255).astype(np.uint8)
            tiles.append(heat)
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
