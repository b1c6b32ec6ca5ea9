"""Per-algorithm data streams, losses and held-out evaluation of the post-training loop (`posttrain.loop`).

SFT: packed chat examples, the model's own LM loss (labels only on assistant tokens) + router losses.
DPO: chosen/rejected pairs in one [2B, T] forward; `losses.dpo_loss` against the frozen reference (+ `sft_coef` NLL).
RLVR: rollouts → rewards → group-relative advantages → clipped policy loss + `kl_coef` · KL(policy ‖ reference).
UPO: RLVR's loss + `upo_coef` · a DPO-style term on each group's best vs worst rollout (or offline DPO pairs).
The exact objectives, with their coefficients, are in docs/posttraining.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ernie_platform.data import DataStats
from ernie_platform.posttrain import data as pdata
from ernie_platform.posttrain import losses
from ernie_platform.posttrain.rollout import Rollout
from ernie_platform.posttrain.tasks import TEST_PERCENT

IGNORE = -100


# ---- data ---------------------------------------------------------------------------------------------------------


def examples(cfg: dict[str, Any], kind: str, split: str, stats: Optional[DataStats] = None) -> list[Any]:
    """Training (`split="train"`) or held-out (`"test"`) examples of `kind` (sft | dpo | rl)."""
    algo, data = cfg["algo"], cfg["data"]
    seed = int(cfg["trainer"]["seed"])
    source = data["source"] if split == "train" else algo.get("eval_source")
    if kind == "dpo" and algo["name"] == "upo" and split == "train" and algo.get("upo_pair_source"):
        source = algo["upo_pair_source"]
    if source and source != "builtin":
        return pdata.read_examples(source, kind, on_error=data["on_error"], fmt=data["format"], stats=stats)
    n = int(algo["train_samples"] if split == "train" else algo["eval_samples"])
    return _builtin(kind, split, n, seed + (0 if split == "train" else 7919), list(algo["tasks"]), algo)


def _builtin(kind: str, split: str, n: int, seed: int, tasks: list[str], algo: dict[str, Any]) -> list[Any]:
    """Held-out examples are distinct problems (at most the whole test split of each task, no repeats)."""
    common = {"test_percent": int(algo.get("test_percent", TEST_PERCENT)), "distinct": split == "test"}
    options = {"arithmetic": {"max_operand": int(algo.get("max_operand", 99)), **common}, "counting": common}
    return pdata.builtin_examples(kind, split, n, seed, tasks, options)


def _epochs(items: list[Any], rank: int, world: int, seed: int) -> Iterator[tuple[int, Any]]:
    """This rank's share of `items`, reshuffled every epoch (seeded): (epoch, item) forever."""
    share = items[rank::world]
    if not share:
        raise ValueError(f"rank {rank}: no examples ({len(items)} in total for {world} ranks)")
    epoch = 0
    while True:
        order = list(range(len(share)))
        random.Random(f"{seed}/{epoch}/{rank}").shuffle(order)
        for i in order:
            yield epoch, share[i]
        epoch += 1


def sft_batches(cfg: dict[str, Any], tokenizer: Any, rank: int, world: int, stats: DataStats) -> Iterator[dict]:
    t = cfg["trainer"]
    items = examples(cfg, "sft", "train", stats)
    max_len = min(int(cfg["algo"]["max_len"]), int(t["seq_len"]))

    def encoded() -> Iterator[tuple[list[int], list[int]]]:
        for epoch, ex in _epochs(items, rank, world, int(t["seed"])):
            stats.epochs = epoch
            try:
                yield pdata.encode_chat(tokenizer, ex.messages, max_len)
            except pdata.TooLong:
                stats.skipped += 1

    return pdata.pack_sft(encoded(), int(t["seq_len"]), int(t["micro_batch_size"]))


def dpo_batches(cfg: dict[str, Any], tokenizer: Any, rank: int, world: int, stats: DataStats) -> Iterator[dict]:
    t = cfg["trainer"]
    items = examples(cfg, "dpo", "train", stats)
    b, max_len = int(t["micro_batch_size"]), int(cfg["algo"]["max_len"])
    batch: list[dict] = []
    for epoch, ex in _epochs(items, rank, world, int(t["seed"])):
        stats.epochs = epoch
        try:
            batch.append(pdata.encode_preference(tokenizer, ex, max_len))
        except pdata.TooLong:
            stats.skipped += 1
            continue
        if len(batch) == b:
            yield pdata.collate_preferences(batch)
            batch = []


# ---- log-probabilities --------------------------------------------------------------------------------------------


def _forward_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(model output, per-token logp [B, T-1], mask [B, T-1]) of the labelled tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logp, mask = losses.token_logprobs(out.logits, batch["labels"])
    return out, logp, mask


def _router(out: Any) -> torch.Tensor:
    return out.router_loss if out.router_loss is not None else torch.zeros(())


# ---- SFT / DPO steps ----------------------------------------------------------------------------------------------


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], int]:
    out = model(**batch)
    metrics = {"loss": float(out.loss.detach()), "lm_loss": float(out.lm_loss.detach())}
    metrics["target_tokens"] = float((batch["labels"] != IGNORE).sum())
    return out.loss, metrics, batch["input_ids"].numel()


def dpo_loss(
    model: nn.Module, ref_ctx: Any, batch: dict[str, torch.Tensor], algo: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, float], int]:
    b = batch["input_ids"].shape[0] // 2
    out, logp, mask = _forward_logps(model, batch)
    seq = (logp * mask).sum(-1)
    with torch.no_grad(), ref_ctx() as ref:
        _, ref_logp, _ = _forward_logps(ref, batch)
        ref_seq = (ref_logp * mask).sum(-1)
    loss, m = losses.dpo_loss(
        seq[:b], seq[b:], ref_seq[:b], ref_seq[b:], float(algo["beta"]), float(algo["label_smoothing"])
    )
    metrics = {k: float(v) for k, v in m.items()}
    metrics["dpo_loss"] = float(loss.detach())
    if float(algo["sft_coef"]) > 0:
        nll = -(logp[:b] * mask[:b]).sum() / mask[:b].sum().clamp_min(1)
        loss = loss + float(algo["sft_coef"]) * nll
        metrics["sft_nll"] = float(nll.detach())
    loss = loss + _router(out)
    metrics["loss"] = float(loss.detach())
    return loss, metrics, int(batch["attention_mask"].sum())


# ---- RL -----------------------------------------------------------------------------------------------------------


@dataclass
class RLBatch:
    input_ids: torch.Tensor  # [B, T] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] completion tokens, -100 elsewhere
    rewards_GN: torch.Tensor  # [G, N] this rank's groups
    advantages_B: torch.Tensor  # [B] = [G * N]
    # Filled by the first `rl_loss` on this batch and reused by later PPO epochs: the log-probabilities of the policy
    # that generated the rollouts (π_old) and of the reference.
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None


def rl_batch(groups: list[list[Rollout]], rewards: list[list[float]], algo: dict[str, Any]) -> RLBatch:
    rows = [r for g in groups for r in g]
    t = max(len(r.prompt_ids) + len(r.output_ids) for r in rows)
    input_ids = torch.zeros(len(rows), t, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        p, n = len(r.prompt_ids), len(r.prompt_ids) + len(r.output_ids)
        input_ids[i, :n] = torch.tensor(r.prompt_ids + r.output_ids)
        labels[i, p:n] = torch.tensor(r.output_ids)
        mask[i, :n] = 1
    rewards_GN = torch.tensor(rewards, dtype=torch.float32)
    adv = losses.group_advantages(rewards_GN, normalize_std=bool(algo["normalize_std"])).reshape(-1)
    return RLBatch(input_ids, mask, labels, rewards_GN, adv)


def rl_loss(
    model: nn.Module,
    ref_ctx: Any,
    batch: RLBatch,
    algo: dict[str, Any],
    pair_batch: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) of one optimizer step on `batch`; the first call on a batch also fixes its `old_logp` (this
    forward's, detached) and, when needed, its `ref_logp`."""
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    out, logp, mask = _forward_logps(model, feed)
    if batch.old_logp is None:
        batch.old_logp = logp.detach()
    pg, m = losses.clipped_policy_loss(
        logp,
        batch.old_logp,
        batch.advantages_B,
        mask,
        float(algo["clip_low"]),
        float(algo["clip_high"]),
        algo["loss_agg"],
    )
    metrics = {"policy_loss": float(pg.detach()), **{k: float(v) for k, v in m.items()}}
    loss = pg
    need_ref = float(algo["kl_coef"]) > 0 or (algo["name"] == "upo" and algo["upo_pairs"] == "online")
    if need_ref and batch.ref_logp is None:
        with torch.no_grad(), ref_ctx() as ref:
            _, batch.ref_logp, _ = _forward_logps(ref, feed)
    ref_logp = batch.ref_logp
    if float(algo["kl_coef"]) > 0:
        kl = losses.masked_mean(losses.kl_penalty(logp, ref_logp, algo["kl_kind"]), mask)
        loss = loss + float(algo["kl_coef"]) * kl
        metrics["kl"] = float(kl.detach())
    if algo["name"] == "upo":
        pair, pm = _upo_term(model, ref_ctx, logp, ref_logp, mask, batch, algo, pair_batch)
        if pair is not None:
            loss = loss + float(algo["upo_coef"]) * pair
        metrics.update(pm)
    with torch.no_grad():
        metrics["entropy"] = float(losses.entropy_from_logits(out.logits.detach(), mask))
    loss = loss + _router(out)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def _upo_term(model, ref_ctx, logp, ref_logp, mask, batch: RLBatch, algo, pair_batch):
    beta = float(algo["beta"])
    if algo["upo_pairs"] == "offline":
        if pair_batch is None:
            return None, {}
        b = pair_batch["input_ids"].shape[0] // 2
        _, plogp, pmask = _forward_logps(model, pair_batch)
        with torch.no_grad(), ref_ctx() as ref:
            _, rlogp, _ = _forward_logps(ref, pair_batch)
        seq, rseq = (plogp * pmask).sum(-1), (rlogp * pmask).sum(-1)
        loss, m = losses.upo_pair_loss(seq[:b], seq[b:], rseq[:b], rseq[b:], beta)
        return loss, {
            "upo/pair_loss": float(loss.detach()),
            "upo/pairs": float(b),
            "upo/pair_accuracy": float(m["rewards/accuracy"]),
        }
    pairs = losses.best_worst_pairs(batch.rewards_GN)
    if not pairs:
        return None, {"upo/pairs": 0.0}
    n = batch.rewards_GN.shape[1]
    best = torch.tensor([g * n + i for g, i, _ in pairs])
    worst = torch.tensor([g * n + j for g, _, j in pairs])
    seq, rseq = (logp * mask).sum(-1), (ref_logp * mask).sum(-1)
    loss, m = losses.upo_pair_loss(seq[best], seq[worst], rseq[best], rseq[worst], beta)
    return loss, {
        "upo/pair_loss": float(loss.detach()),
        "upo/pairs": float(len(pairs)),
        "upo/pair_accuracy": float(m["rewards/accuracy"]),
    }


# ---- evaluation ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    items: list[Any],
    reward_fn: Any,
    max_new_tokens: int,
    details: Optional[list[dict[str, Any]]] = None,
) -> dict[str, float]:
    """Greedy answers to held-out prompts with the inference engine: exact-match accuracy and mean reward;
    `details` (a list) receives one record per prompt (prompt, task, answer, output, correct, reward)."""
    from ernie_platform.inference import Engine, SamplingParams
    from ernie_platform.posttrain.rewards import exact_match, score

    was = model.training
    # an SFT example ends with its answer: the prompt is everything before it
    convs = [ex.messages[:-1] if isinstance(ex, pdata.SFTExample) else ex.messages for ex in items]
    prompts = [pdata.encode_prompt(tokenizer, msgs) for msgs in convs]
    engine = Engine(model, tokenizer, max_batch_size=64, max_seq_len=max(len(p) for p in prompts) + max_new_tokens)
    try:
        outs = engine.generate_batch(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    finally:
        model.train(was)
    truths = [_truth(ex) for ex in items]
    exact = [exact_match("", o.text, gt) for o, gt in zip(outs, truths)]
    rewards = [score(reward_fn, msgs[-1]["content"], o.text, gt)[0] for msgs, o, gt in zip(convs, outs, truths)]
    if details is not None:
        for ex, msgs, o, gt, ok, r in zip(items, convs, outs, truths, exact, rewards):
            task = getattr(ex, "task", None)
            details.append(dict(prompt=msgs[-1]["content"], task=task, answer=gt, output=o.text, correct=ok, reward=r))
    return {"eval/accuracy": sum(exact) / len(exact), "eval/reward": sum(rewards) / len(rewards)}


def _truth(ex: Any) -> Any:
    if isinstance(ex, pdata.RLExample):
        return ex.ground_truth
    if isinstance(ex, pdata.PreferenceExample):
        return ex.chosen
    return ex.messages[-1]["content"]


@torch.no_grad()
def evaluate_preferences(
    model: nn.Module, ref_ctx: Any, tokenizer: Any, items: list[Any], beta: float
) -> dict[str, float]:
    """Held-out preference accuracy: the share of pairs whose implicit reward β(π − π_ref) ranks chosen first."""
    was = model.training
    model.eval()
    wins, margins = [], []
    try:
        for i in range(0, len(items), 32):
            enc = [pdata.encode_preference(tokenizer, ex) for ex in items[i : i + 32]]
            batch = pdata.collate_preferences(enc)
            b = len(enc)
            _, logp, mask = _forward_logps(model, batch)
            with ref_ctx() as ref:
                _, ref_logp, _ = _forward_logps(ref, batch)
            r = beta * ((logp - ref_logp) * mask).sum(-1)
            wins += (r[:b] > r[b:]).float().tolist()
            margins += (r[:b] - r[b:]).tolist()
    finally:
        model.train(was)
    return {"eval/preference_accuracy": sum(wins) / len(wins), "eval/reward_margin": sum(margins) / len(margins)}


def finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


__all__ = [
    "RLBatch",
    "dpo_batches",
    "dpo_loss",
    "evaluate_generation",
    "evaluate_preferences",
    "examples",
    "finite",
    "rl_batch",
    "rl_loss",
    "sft_batches",
    "sft_loss",
]
