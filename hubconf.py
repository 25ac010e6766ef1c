"""torch.hub entry point: a mohico-pretrained video encoder from a checkpoint.

    encoder = torch.hub.load(REPO_DIR, "mohico_encoder", source="local", path="runs/mcl")
    embedding = encoder(encoder.preprocessing(frames))      # frames: uint8 (T, H, W, 3) -> (1, D)

``path``: anything ``mohico export`` reads (a run directory, a checkpoint folder, a backbone file
from ``mohico export --format mohico``, DeepSpeed zero_to_fp32's output with ``config=``).
"""

dependencies = ["torch", "torchvision"]


def mohico_encoder(path, config=None, device="cpu"):
    """The pretrained backbone (eval mode) with its training preprocessing as ``.preprocessing``."""
    from mohico import load_encoder

    encoder, _ = load_encoder(path, config=config, device=device)
    return encoder
