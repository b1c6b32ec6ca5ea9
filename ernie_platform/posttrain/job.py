"""Driver of the post-training job: the pretraining driver (`training.job.run_train_job`) with the post-training
worker loop, and one line saying where the policy starts."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ernie_platform.posttrain.loop import RL, train_loop_per_worker
from ernie_platform.posttrain.policy import start_of
from ernie_platform.training.job import resolve, run_train_job
from ernie_platform.training.loop import export_dir


def run_posttraining(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run `+algo=…` to the end; returns run id, tracking URI, export path and final metrics (as pretraining)."""
    plain = resolve(cfg)
    algo = plain["algo"]
    if algo.get("name") is None:
        raise ValueError("no algorithm selected: add +algo=sft|dpo|rlvr|upo")
    start = start_of(plain, export_dir(plain))
    extra = 0.0
    if algo["name"] in RL:
        extra = int(algo["rollout"]["num_actors"]) * float(algo["rollout"]["cpus_per_actor"])
    line = f"{algo['name']} ({algo['finetune']} fine-tuning): {start.message}"
    return run_train_job(plain, train_loop_per_worker, line, extra_cpus=extra)


__all__ = ["run_posttraining"]
