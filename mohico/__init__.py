"""mohico: distributed self-supervised video pretraining on untrimmed videos (MCL, HiCo, MotionSqueeze).

    import mohico
    encoder, prep = mohico.load_encoder("runs/mcl")     # a run, a checkpoint or an exported backbone file
    embedding = encoder(prep(frames))                   # frames: uint8 (T, H, W, 3) -> (1, D)
"""

__version__ = "0.1.0"

from mohico import library_noise as _library_noise   # noqa: E402 - stdlib only: keeps `import mohico` light

_library_noise.install()   # library messages the user cannot act on, by their exact text (see the module)


def load_encoder(path, config=None, device="cpu"):
    """``(backbone, preprocessing)``: the pretrained backbone (eval mode) and the preprocessing
    its training clips had; see :func:`mohico.models.encoder.load_encoder`. (Imported on call,
    so ``import mohico`` stays light.)"""
    from mohico.models.encoder import load_encoder as _load_encoder

    return _load_encoder(path, config=config, device=device)
