"""Post-training: supervised fine-tuning, preference optimization and RL with verifiable rewards."""
