"""Pretraining job (`python -m workloads.pretrain`). The staged Ray Train + DeepSpeed job lands with issue #5."""
