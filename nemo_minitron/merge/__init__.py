"""Model merging (SLERP, linear, task arithmetic) of checkpoints of one shape, streamed tensor
by tensor from and into distributed checkpoints, with mergekit's conventions."""
