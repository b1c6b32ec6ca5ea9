"""Training: the Ray Train + DeepSpeed pretraining job (driver `job`, worker loop `loop`, strategy, stages)."""
