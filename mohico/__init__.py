"""mohico: distributed self-supervised video pretraining on untrimmed videos (MCL, HiCo, MotionSqueeze)."""

__version__ = "0.1.0"
