"""Video data, stage by stage: ``write`` (videos -> shards with motion maps), ``load`` (shards ->
sampled, decoded, augmented training batches), ``synthetic`` (videos with known ground truth for
the demo and the tests), ``inspect`` (a picture of one shard sample and the sampler's draw)."""
