"""Post-training end to end on a real local Ray (shared instance), Ray Train, DeepSpeed and a SQLite MLflow store.

Every algorithm runs a few steps on the tiny random MoE checkpoint with its own tokenizer (`tiny_moe_ckpt`, like a
user's transformers-format checkpoint): it exits cleanly, its MLflow run holds the algorithm's metrics, and its
export loads in transformers. Also: LoRA (adapters saved on their own, merged export), a rollout actor killed
mid-run (restarted, iteration retried), a trainer worker killed mid-run (resumed from its checkpoint), a reward
function that raises, bad records, and the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ernie_platform.posttrain.job import run_posttraining
from ernie_platform.training.job import JobFailed
from ernie_platform.training.tracking import metric_history
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

FAST = [
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.checkpoint_every=0",
    "algo.train_samples=400",
    "algo.eval_samples=16",
    "algo.max_operand=20",
]
RL_FAST = ["algo.rollout.prompts_per_step=4", "algo.rollout.group_size=4", "algo.rollout.max_new_tokens=4"]


def _run(ckpt: Path, storage: Path, algo: str, name: str, *extra: str) -> dict:
    cfg = compose_config(
        f"+algo={algo}", f"model.path={ckpt}", f"run.storage_path={storage}", f"run.name={name}", *FAST, *extra
    )
    return run_posttraining(cfg)


def _metrics(result: dict) -> dict[str, list[float]]:
    client = MlflowClient(result["tracking_uri"])
    keys = list(client.get_run(result["run_id"]).data.metrics)
    history = metric_history(result["tracking_uri"], result["run_id"], keys)
    return {k: [v for _, v in pairs] for k, pairs in history.items()}


def _loads_in_transformers(export: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("What is 2+3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("posttrain")


def test_sft_end_to_end(ray_local, tiny_moe_ckpt: Path, storage: Path) -> None:
    result = _run(tiny_moe_ckpt, storage, "sft", "sft", "trainer.seq_len=128", "trainer.micro_batch_size=2")
    assert result["export"] == str(storage / "sft" / "export")
    m = _metrics(result)
    assert len(m["loss"]) == 3 and all(v > 0 for v in m["loss"])
    for key in ("lm_loss", "tokens_per_s", "lr", "grad_norm", "eval/accuracy", "eval/reward"):
        assert key in m, key
    assert MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).info.status == "FINISHED"
    _loads_in_transformers(result["export"])


def test_dpo_with_lora_saves_adapters_and_a_merged_export(ray_local, tiny_moe_ckpt: Path, storage: Path) -> None:
    from ernie_platform.models import load_pretrained

    result = _run(
        tiny_moe_ckpt, storage, "dpo", "dpo-lora", "algo.finetune=lora", "trainer.micro_batch_size=4", "trainer.lr=1e-2"
    )
    m = _metrics(result)
    for key in ("rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected", "eval/preference_accuracy"):
        assert key in m, key
    adapters = storage / "dpo-lora" / "adapters"
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (adapters / "adapter_model.safetensors").is_file()
    # merged export: same keys as the base checkpoint; attention weights moved, routed experts untouched
    base, tuned = load_pretrained(tiny_moe_ckpt).state_dict(), load_pretrained(result["export"]).state_dict()
    assert set(base) == set(tuned)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q], tuned[q])
    experts = [k for k in base if "w13" in k or "experts" in k]
    assert experts and all(torch.equal(base[k], tuned[k]) for k in experts)
    _loads_in_transformers(result["export"])


def test_rlvr_with_a_rollout_actor_killed_mid_run(ray_local, tiny_moe_ckpt: Path, storage: Path) -> None:
    result = _run(tiny_moe_ckpt, storage, "rlvr", "rlvr", *RL_FAST, "algo.rollout.fail_at_step=1")
    m = _metrics(result)
    for key in ("reward", "accuracy", "kl", "entropy", "response_length", "clip_fraction", "tokens_per_s"):
        assert key in m, key
    assert len(m["reward"]) == 3
    assert m["rollout_restarts"][-1] >= 1  # the actor died at step 1, came back, and the iteration was retried
    assert (storage / "rlvr" / ".rollout_failure_injected_at_1").is_file()
    _loads_in_transformers(result["export"])


def test_upo_online_pairs_and_a_raising_reward(ray_local, tiny_moe_ckpt: Path, storage: Path, tmp_path: Path) -> None:
    reward_file = tmp_path / "flaky_reward.py"
    reward_file.write_text(
        "def reward(prompt, completion, ground_truth):\n"
        "    if len(completion) % 2:\n"
        "        raise ValueError('odd completion')\n"
        "    return float(len(completion)) / 10\n"
    )
    result = _run(
        tiny_moe_ckpt, storage, "upo", "upo", *RL_FAST, f"algo.reward={reward_file}:reward", "algo.reward_on_error=-1"
    )
    m = _metrics(result)
    assert "upo/pairs" in m and "upo/pair_loss" in m
    assert sum(m["reward_errors"]) > 0  # scored -1 and reported, the run went on
    assert min(m["reward"]) >= -1
    _loads_in_transformers(result["export"])


def test_sft_resumes_after_a_worker_dies(ray_local, tiny_moe_ckpt: Path, storage: Path) -> None:
    args = ["trainer.seq_len=128", "trainer.micro_batch_size=2", "trainer.max_steps=4", "trainer.checkpoint_every=2"]
    result = _run(tiny_moe_ckpt, storage, "sft", "sft-fail", *args, "trainer.fail_at_step=3", "trainer.fail_rank=1")
    assert (storage / "sft-fail" / ".failure_injected_at_3").is_file()
    m = _metrics(result)
    assert int(result["metrics"]["step"]) == 4 and len(m["loss"]) >= 4


def test_bad_record_names_file_and_line(ray_local, tiny_moe_ckpt: Path, storage: Path, tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text('{"src": ["hi"], "tgt": ["hello"]}\n{"src": ["hi"]}\n')
    with pytest.raises(JobFailed, match=r"sft\.jsonl:2"):
        _run(tiny_moe_ckpt, storage, "sft", "bad", f"data.source={data}", "trainer.num_workers=1")


def test_cli_requires_an_algorithm_and_rejects_bad_values() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "workloads.posttrain", "algo.beta=0.1"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "+algo=sft|dpo|rlvr|upo" in proc.stderr
    with pytest.raises(ValueError, match=r"algo\.rollout\.group_size=1"):
        compose_config("+algo=rlvr", "algo.rollout.group_size=1")
    with pytest.raises(ValueError, match=r"algo\.finetune='qlora'"):
        compose_config("+algo=sft", "algo.finetune=qlora")
