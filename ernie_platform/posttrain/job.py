"""Driver of the post-training job: the pretraining driver (`training.job.run_train_job`) with the post-training
worker loop, and one line saying where the policy starts and which chat template it is trained with.

Before Ray starts, the driver checks the config's paths (`training.preflight.check_paths`) and the chat template
(`policy.check_chat_template`): a checkpoint whose tokenizer has none gets ERNIE 4.5's (logged, and recorded in the
MLflow run as the param `algo.chat_template_source`), or — not an ERNIE 4.5 text model — the job stops at once."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ernie_platform.posttrain.loop import RL, train_loop_per_worker
from ernie_platform.posttrain.policy import check_chat_template, start_of
from ernie_platform.training.job import resolve, run_train_job
from ernie_platform.training.loop import export_dir
from ernie_platform.training.preflight import check_paths


def run_posttraining(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run `+algo=…` to the end; returns run id, tracking URI, export path and final metrics (as pretraining)."""
    plain = resolve(cfg)
    algo = plain["algo"]
    if algo.get("name") is None:
        raise ValueError("no algorithm selected: add +algo=sft|dpo|rlvr|upo")
    check_paths(plain)
    start = start_of(plain, export_dir(plain))
    template = check_chat_template(start)
    # The workers make the same choice on the tokenizer they load; the param records it on the MLflow run.
    algo["chat_template_source"] = template.source
    if template.source == "ernie45":
        print(f"[{plain['run']['name']}] {template.message}", flush=True)
    extra = 0.0
    if algo["name"] in RL:
        extra = int(algo["rollout"]["num_actors"]) * float(algo["rollout"]["cpus_per_actor"])
    line = f"{algo['name']} ({algo['finetune']} fine-tuning): {start.message}; chat template: {template.message}"
    return run_train_job(plain, train_loop_per_worker, line, extra_cpus=extra)


__all__ = ["run_posttraining"]
