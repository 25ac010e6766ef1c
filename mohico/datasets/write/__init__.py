"""Writing shards (``mohico shards``): list the inputs, transcode each video to a canonical
constant-frame-rate file, compute its motion maps, write deterministic WebDataset tars + DALI
indexes. Official UCF101/HMDB51 splits choose the inputs of a benchmark."""
