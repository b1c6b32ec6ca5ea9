"""Schema of the `algo` node: post-training (SFT, DPO, RLVR, UPO) on top of the pretraining config.

`conf/algo/<name>.yaml` files are `# @package _global_` groups selected with `+algo=<name>` (like `+stage=`); they
set `algo.name` and the trainer/run defaults of that algorithm. docs/posttraining.md explains every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from ernie_platform.posttrain.lora import LoRAConfig

ALGORITHMS = ("sft", "dpo", "rlvr", "upo")


@dataclass
class LoRASchema(LoRAConfig):
    """`algo.lora` (used when `algo.finetune=lora`): the adapter's own config (r, alpha, dropout, target_modules —
    Linear layers by name; routed experts are stacked tensors and never adapted) plus what the job does with it."""

    save_adapters: bool = True  # also write the adapters alone (PEFT layout) to <run>/adapters/


@dataclass
class RolloutSchema:
    """`algo.rollout`: the Ray actors that generate RL rollouts with the inference engine."""

    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    prompts_per_step: int = 16  # prompts per RL iteration (all ranks together); each gets group_size samples
    group_size: int = 8  # samples per prompt (GRPO group)
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_batch_size: int = 128  # engine KV rows per actor
    max_restarts: int = 2  # Ray restarts a dead rollout actor this many times; the iteration is retried
    fail_at_step: Optional[int] = None  # fault injection: actor 0 exits once when asked to generate at this step


@dataclass
class AlgoConfig:
    name: Optional[str] = None  # sft | dpo | rlvr | upo (set by conf/algo/*.yaml)
    finetune: str = "full"  # full | lora
    lora: LoRASchema = field(default_factory=LoRASchema)
    # ---- data: data.source=builtin uses these built-in verifiable tasks (ernie_platform.posttrain.tasks) ----
    tasks: List[str] = field(default_factory=lambda: ["arithmetic"])
    max_operand: int = 50  # arithmetic operands are drawn from 0..max_operand
    train_samples: int = 20000  # built-in training examples
    test_percent: int = 10  # share of each built-in task's problems held out (split by a hash of the problem)
    eval_samples: int = 1000  # built-in held-out examples for the end-of-run evaluation (distinct problems)
    eval_source: Optional[str] = None  # held-out file (same format as data.source); None: built-in test split
    max_len: int = 256  # longest tokenized example (prompt + response); longer ones are skipped and counted
    # ---- DPO (and UPO's pair term) ----
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_coef: float = 0.0  # DPO: + sft_coef * NLL of the chosen response
    # ---- RLVR / UPO ----
    rollout: RolloutSchema = field(default_factory=RolloutSchema)
    reward: str = "arithmetic"  # a registered reward name, or path/to/file.py:function, or package.module:function
    reward_on_error: str = "0.0"  # score of a sample whose reward function raises, or "raise" to fail the run
    clip_low: float = 0.2
    clip_high: float = 0.2
    ppo_epochs: int = 1  # optimizer steps on each batch of rollouts (the clip matters from the second one on)
    kl_coef: float = 0.0  # KL(policy || reference) penalty coefficient (0: no reference forward)
    kl_kind: str = "k3"  # k1 | k2 | k3
    loss_agg: str = "token_mean"  # token_mean | seq_mean
    normalize_std: bool = True  # GRPO's std normalisation of group advantages (False: Dr. GRPO)
    upo_coef: float = 0.5  # UPO: weight of the pairwise preference term
    upo_pairs: str = "online"  # online (best vs worst rollout of each group) | offline (pairs from a DPO dataset)
    upo_pair_source: Optional[str] = None  # offline pairs file; None: the built-in DPO pairs
    eval_every: int = 0  # held-out evaluation every N steps (0: only at the end)


def check_algo(algo: Any, trainer: Any) -> None:
    """ValueError naming the `algo.*` field and value that is not valid (called by `validate_config`)."""

    def bad(key: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"config: algo.{key}={value!r} is not valid (expected {allowed})")

    if algo.name is None:
        return
    if algo.name not in ALGORITHMS:
        raise bad("name", algo.name, f"one of {list(ALGORITHMS)} (select with +algo=NAME)")
    if algo.finetune not in ("full", "lora"):
        raise bad("finetune", algo.finetune, "full or lora")
    if algo.lora.r < 1:
        raise bad("lora.r", algo.lora.r, "an integer >= 1")
    if not algo.lora.target_modules:
        raise bad("lora.target_modules", list(algo.lora.target_modules), "a non-empty list of Linear layer names")
    if not 1 <= algo.test_percent <= 99:
        raise bad("test_percent", algo.test_percent, "an integer in [1, 99]")
    if algo.beta <= 0:
        raise bad("beta", algo.beta, "a positive number")
    if not 0 <= algo.label_smoothing < 0.5:
        raise bad("label_smoothing", algo.label_smoothing, "a number in [0, 0.5)")
    if algo.kl_kind not in ("k1", "k2", "k3"):
        raise bad("kl_kind", algo.kl_kind, "k1, k2 or k3")
    if algo.loss_agg not in ("token_mean", "seq_mean"):
        raise bad("loss_agg", algo.loss_agg, "token_mean or seq_mean")
    if algo.upo_pairs not in ("online", "offline"):
        raise bad("upo_pairs", algo.upo_pairs, "online or offline")
    if algo.ppo_epochs < 1:
        raise bad("ppo_epochs", algo.ppo_epochs, "an integer >= 1")
    if algo.reward_on_error != "raise":
        try:
            float(algo.reward_on_error)
        except ValueError:
            raise bad("reward_on_error", algo.reward_on_error, 'a number or "raise"') from None
    r = algo.rollout
    for key in ("num_actors", "prompts_per_step", "group_size", "max_new_tokens", "max_batch_size"):
        if getattr(r, key) < 1:
            raise bad(f"rollout.{key}", getattr(r, key), "an integer >= 1")
    if algo.name in ("rlvr", "upo"):
        if r.group_size < 2:
            raise bad("rollout.group_size", r.group_size, "at least 2 (group-relative advantages)")
        if r.prompts_per_step % trainer.num_workers:
            workers = f"a multiple of trainer.num_workers={trainer.num_workers}"
            raise bad("rollout.prompts_per_step", r.prompts_per_step, workers)
        if trainer.zero_stage == 3:
            raise ValueError(
                f"config: algo.name={algo.name} needs trainer.zero_stage <= 2 (the rollout weight sync reads whole "
                "parameters; ZeRO-3 partitions them)"
            )
