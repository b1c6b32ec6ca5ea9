"""RL rollouts: Ray actors that run the inference engine (`ernie_platform.inference.Engine`, the one serving uses).

Every iteration the trainer's rank 0 puts the policy's current weights in the object store once and each actor loads
them (`RolloutPool.sync`), then the prompts are spread over the actors and sampled `group_size` times each with
per-prompt seeds, so a retried iteration samples the same completions. An actor that dies is restarted by Ray
(`max_restarts`); the pool then re-sends the weights and retries the iteration (`max_retries` times).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ray


@dataclass
class Rollout:
    prompt_index: int  # index into the iteration's prompt list
    prompt_ids: list[int]
    output_ids: list[int]  # generated tokens, including a final EOS
    text: str  # decoded completion (EOS and special tokens excluded)
    finish_reason: str


@ray.remote
class RolloutWorker:
    """One inference engine over a copy of the policy; weights replaced in place by `load_weights`."""

    def __init__(self, model_cfg: dict[str, Any], start_path: Optional[str], engine_kw: dict[str, Any], cpus: float):
        import torch

        from ernie_platform.configs.schema import to_model_args
        from ernie_platform.inference import Engine
        from ernie_platform.inference.loading import load_model_and_tokenizer
        from ernie_platform.models import ErnieForCausalLM, load_tokenizer
        from ernie_platform.posttrain.policy import environment_threads

        environment_threads(cpus)
        if start_path:
            model, tokenizer = load_model_and_tokenizer(start_path, dtype=torch.float32)
        else:  # the demo model: its weights come with the first sync
            model, tokenizer = ErnieForCausalLM(to_model_args(model_cfg)), load_tokenizer(None)
        self.engine = Engine(model.eval(), tokenizer, **engine_kw)
        self.version = -1

    def ready(self) -> bool:
        return True

    def load_weights(self, state: dict[str, Any], version: int) -> int:
        missing, unexpected = self.engine.model.load_state_dict(state, strict=False)
        # Non-persistent buffers (e.g. rotary tables) are absent from state dicts; anything else is a real mismatch.
        if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
            raise RuntimeError(
                f"rollout weights do not fit the engine's model: missing {missing}, unexpected {unexpected}"
            )
        self.version = version
        return version

    def generate(self, prompts: list[list[int]], params: list[dict[str, Any]], fail_marker: Optional[str] = None):
        """Completions for every prompt (`n` per prompt, from its params), in order; `fail_marker`: fault injection
        — exit the process once (the marker file remembers it), as a crashed rollout node would."""
        from ernie_platform.inference import SamplingParams

        if fail_marker and not Path(fail_marker).exists():
            Path(fail_marker).parent.mkdir(parents=True, exist_ok=True)
            Path(fail_marker).write_text("injected\n")
            os._exit(1)
        outs = self.engine.generate_batch(prompts, [SamplingParams(**p) for p in params])
        return [(c.output_ids, c.text, c.finish_reason) for c in outs]


class RolloutPool:
    def __init__(self, cfg: dict[str, Any], start_path: Optional[str], run_dir: str):
        r = cfg["algo"]["rollout"]
        self.cfg, self.r, self.run_dir = cfg, r, run_dir
        longest = int(cfg["algo"]["max_len"]) + int(r["max_new_tokens"])
        engine_kw = {"max_batch_size": int(r["max_batch_size"]), "max_seq_len": longest}
        self.actors = [
            RolloutWorker.options(
                num_cpus=float(r["cpus_per_actor"]),
                num_gpus=float(r["gpus_per_actor"]),
                max_restarts=int(r["max_restarts"]),
                max_task_retries=0,
            ).remote(cfg["model"], start_path, engine_kw, float(r["cpus_per_actor"]))
            for _ in range(int(r["num_actors"]))
        ]
        self.max_retries = int(r["max_restarts"])
        self.restarts = 0

    def sync(self, state: dict[str, Any], version: int) -> None:
        ref = ray.put(state)
        ray.get([a.load_weights.remote(ref, version) for a in self.actors])

    def generate(
        self, prompts: list[list[int]], step: int, seed: int, state: dict[str, Any], version: int
    ) -> list[list[Rollout]]:
        """`group_size` rollouts per prompt (grouped by prompt, in prompt order); retried after an actor died."""
        r = self.r
        n = int(r["group_size"])
        params = [
            {
                "max_tokens": int(r["max_new_tokens"]),
                "temperature": float(r["temperature"]),
                "top_p": float(r["top_p"]),
                "top_k": int(r["top_k"]),
                "seed": (seed * 1_000_003 + step * 10_007 + i * 101) % 2**62,
                "n": n,
            }
            for i in range(len(prompts))
        ]
        fail_at = r.get("fail_at_step")
        marker = str(Path(self.run_dir) / f".rollout_failure_injected_at_{fail_at}") if fail_at == step else None
        for attempt in range(self.max_retries + 1):
            try:
                if attempt:
                    self._wait_restarted()
                    self.sync(state, version)  # a restarted actor came back with its initial weights
                chunks = [list(range(i, len(prompts), len(self.actors))) for i in range(len(self.actors))]
                futures = [
                    a.generate.remote([prompts[i] for i in idx], [params[i] for i in idx], marker if k == 0 else None)
                    for k, (a, idx) in enumerate(zip(self.actors, chunks))
                    if idx
                ]
                results = ray.get(futures)
                break
            except ray.exceptions.RayActorError as e:
                self.restarts += 1
                if attempt == self.max_retries:
                    raise RuntimeError(f"rollout actors failed {attempt + 1} times at step {step}: {e}") from e
                print(f"step {step}: a rollout actor died ({type(e).__name__}); retrying the iteration", flush=True)
        groups: list[list[Rollout]] = [[] for _ in prompts]
        for idx, result in zip((c for c in chunks if c), results):
            for j, i in enumerate(idx):
                for out_ids, text, finish in result[j * n : (j + 1) * n]:
                    groups[i].append(Rollout(i, prompts[i], list(out_ids), text, finish))
        return groups

    def _wait_restarted(self, timeout_s: float = 300.0) -> None:
        """Block until every actor answers again (Ray restarts a dead one, re-running its constructor)."""
        deadline = time.time() + timeout_s
        for actor in self.actors:
            while True:
                try:
                    ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.time()))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                    if time.time() > deadline:
                        raise RuntimeError(f"a rollout actor did not come back within {timeout_s:.0f} s: {e}") from e
                    time.sleep(1.0)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


__all__ = ["Rollout", "RolloutPool", "RolloutWorker"]
