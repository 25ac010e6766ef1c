"""Synthetic videos with known ground truth (``mohico synth``): topic videos with shots and
moving objects, a motion benchmark where appearance is a distractor, and small UCF101/HMDB51-shaped
trees."""
