"""`python -m workloads.pretrain` (the smoke run until the staged Ray Train job lands) trains and exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from ernie_platform.configs import register_configs
from ernie_platform.models import load_pretrained
from ernie_platform.training.smoke import lr_at, run_smoke

ROOT = Path(__file__).resolve().parents[1]


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_at(0, 100, 1.0, 10, 0.1) == 0.1
    assert lr_at(9, 100, 1.0, 10, 0.1) == 1.0
    assert abs(lr_at(55, 100, 1.0, 10, 0.1) - 0.55) < 1e-9  # cosine midpoint between 1.0 and 0.1
    assert abs(lr_at(100, 100, 1.0, 10, 0.1) - 0.1) < 1e-9


def test_training_reduces_loss_in_process(tmp_path: Path) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "model=ernie45_tiny_moe",
                "trainer.max_steps=30",
                "trainer.micro_batch_size=4",
                "trainer.seq_len=64",
                "trainer.lr=3e-3",
                "moe.bias_update_rate=1e-3",
                f"run.storage_path={tmp_path}",
                "run.name=t",
            ],
        )
    result = run_smoke(cfg)
    losses = result["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    model = load_pretrained(result["export"])
    bias = model.moe_blocks()[0].gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # aux-free balancing moved the bias and it was saved


def test_pretrain_entrypoint_mm_stage_exports_transformers_checkpoint(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "workloads.pretrain", "+stage=mm", "model=ernie45_tiny_moe", "trainer.max_steps=3",
        "trainer.micro_batch_size=2", "trainer.seq_len=32", f"run.storage_path={tmp_path}", "run.name=smoke",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage=mm" in proc.stderr + proc.stdout
    export = tmp_path / "smoke" / "export"
    ours = load_pretrained(export)
    ref = AutoModelForCausalLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
    ids = torch.tensor([tok.encode("2 plus 2 equals 4.", add_special_tokens=False)])
    with torch.no_grad():
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_pretrain_entrypoint_rejects_bad_override(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "workloads.pretrain", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr
