"""The defaults of ``write_shards`` and of `mohico shards`, in one place so the two cannot drift
apart (and without imports, so ``mohico --help`` stays fast)."""

DEFAULT_CODEC = "vp9"
DEFAULT_SHORT_SIDE = 128
DEFAULT_FPS = 15
DEFAULT_GOP = 16
DEFAULT_MAX_SHARD_SIZE = "1GB"
DEFAULT_FLOW = "dis"
DEFAULT_MIN_FRAMES = 16
