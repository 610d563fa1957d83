"""Training: the loop over both stages, checkpoints, multi-process and DeepSpeed support."""
