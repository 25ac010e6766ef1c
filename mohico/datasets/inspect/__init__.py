"""``mohico inspect``: a picture of one shard sample (frames, motion maps, T-motion curve) and
the training sampler's draw for it as overlays."""
