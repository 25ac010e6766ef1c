"""Reading shards for training (``build_loader``): stream samples per worker, sample clips and
boxes (HiCo gradual / MCL motion-focused), remux the GOPs a clip needs, decode + crop + augment
with DALI (or PyAV/OpenCV), and check at start that the data can feed the run."""
