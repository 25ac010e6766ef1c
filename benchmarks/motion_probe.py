"""Does a backbone see motion at all? ``motion_probe`` scores a motion-ablation run's saved eval
features (``RUN/features-test{N}.npz`` of ``benchmarks/motion_ablation.py``) on the clips the
ground truth calls moving or still; ``motion_ablation.py --table`` prints it under the table."""
from __future__ import annotations

import json
from pathlib import Path


def motion_probe(features: Path, videos: tuple[Path, Path], cfg, clips: int) -> dict:
    """Does the backbone see motion at all? On a run's saved eval features (``features``):
    clip-level kNN of moving (>70% of frames in motion, from the ground truth) test clips among
    moving train clips, the same for still (<30%) clips, and a 2-way kNN of moving-vs-still with
    the majority-answer baseline."""
    import numpy as np
    import torch

    from mohico.eval.knn import knn_scores
    from motion_sanity import moving_fractions

    f = np.load(features)

    def moving(sources, folder):       # at the clips' own stride (before 2026-12-06: data.frame_stride stored frames)
        return np.array([moving_fractions(json.loads((folder / Path(str(src)).with_suffix(".json").name).read_text()),
                                          cfg.data, clips) for src in sources]).reshape(-1)

    classes = sorted(set(f["train_labels"].tolist()))
    x = {k: f[k].reshape(-1, f[k].shape[-1]) for k in ("train", "test")}
    y = {k: np.repeat([classes.index(v) for v in f[f"{k}_labels"].tolist()], f[k].shape[1]) for k in ("train", "test")}
    m = {"train": moving(f["train_sources"], videos[0]), "test": moving(f["test_sources"], videos[1])}

    def knn_acc(a, b, labels_a, labels_b, num):
        s = knn_scores(torch.from_numpy(x["train"][a]), torch.from_numpy(labels_a[a]), torch.from_numpy(x["test"][b]), num)
        return float((s.argmax(1).numpy() == labels_b[b]).mean())

    res = {"moving_clips_knn": knn_acc(m["train"] > 0.7, m["test"] > 0.7, y["train"], y["test"], len(classes)),
           "still_clips_knn": knn_acc(m["train"] < 0.3, m["test"] < 0.3, y["train"], y["test"], len(classes))}
    mv_tr, mv_te = (m["train"] > 0.5).astype(np.int64), (m["test"] > 0.5).astype(np.int64)
    res["moving_vs_still_knn"] = knn_acc(m["train"] >= 0, m["test"] >= 0, mv_tr, mv_te, 2)
    res["moving_vs_still_majority"] = float(max(mv_te.mean(), 1 - mv_te.mean()))
    return res
