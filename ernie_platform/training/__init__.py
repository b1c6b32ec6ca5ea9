"""Training: the single-process smoke run now; Ray Train + DeepSpeed loops land with the pretraining issue."""
