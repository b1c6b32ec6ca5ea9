"""Runnable jobs: `python -m workloads.pretrain`, later `workloads.posttrain` and `workloads.serve`."""
