import subprocess
import time
from pathlib import Path

import pytest
import torch

# conf/model/ernie45_tiny_moe.yaml with a larger init, so greedy argmax margins are far above float noise
TINY_MOE_ARGS = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
    moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1, initializer_range=0.3,
)  # fmt: skip


def compose_config(*overrides: str):
    """`conf/config.yaml` composed with `overrides` and validated, as the workload entrypoints do."""
    from hydra import compose, initialize_config_dir

    from ernie_platform.configs import register_configs, validate_config

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    validate_config(cfg)
    return cfg


def read_until(proc: subprocess.Popen, marker: str, timeout_s: float = 240) -> list[str]:
    """Lines of `proc`'s text stdout up to and including the first that contains `marker` (a server's readiness line),
    or all it printed before exiting or before `timeout_s`; the caller asserts on them."""
    lines: list[str] = []
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if marker in line:
            break
    return lines


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by every integration test of the run (Ray takes ~10-15 s to start here)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # 4 logical CPUs on 2 cores: 2 train workers + room for Ray Data read tasks and small actors.
        # address="local": never join a cluster that `ray start` left running on this machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny MoE saved with the built-in tokenizer (directory name `ckpt`); read-only for the tests."""
    from ernie_platform.models import ErnieForCausalLM, ErnieModelArgs, load_tokenizer, save_pretrained

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ErnieForCausalLM(ErnieModelArgs(**TINY_MOE_ARGS)).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("tiny_moe") / "ckpt", tokenizer=load_tokenizer(None))
