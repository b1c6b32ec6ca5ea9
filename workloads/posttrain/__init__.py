"""Post-training jobs (SFT, DPO, LoRA). Not implemented yet: lands with issue #7."""
