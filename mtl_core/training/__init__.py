"""Training: device selection, the loop, and the `train` stage."""
