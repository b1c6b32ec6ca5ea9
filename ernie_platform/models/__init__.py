"""ERNIE 4.5 models: one implementation for training, RL rollouts and serving."""

from ernie_platform.models.cache import KVCache
from ernie_platform.models.checkpoint import CheckpointError, cast_model, load_pretrained, save_pretrained
from ernie_platform.models.config import ErnieModelArgs, MoEConfig
from ernie_platform.models.ernie import ErnieForCausalLM, ErnieOutput, causal_lm_loss
from ernie_platform.models.flops import ParamCounts, count_params, flops_per_token, mfu
from ernie_platform.models.tokenizer import builtin_tokenizer, load_tokenizer


def build_model(args: ErnieModelArgs, moe_cfg: MoEConfig | None = None) -> ErnieForCausalLM:
    """A randomly initialised model for `args` (fp32)."""
    return ErnieForCausalLM(args, moe_cfg)


__all__ = [
    "CheckpointError",
    "ErnieForCausalLM",
    "ErnieModelArgs",
    "ErnieOutput",
    "KVCache",
    "MoEConfig",
    "ParamCounts",
    "build_model",
    "builtin_tokenizer",
    "cast_model",
    "causal_lm_loss",
    "count_params",
    "flops_per_token",
    "load_pretrained",
    "load_tokenizer",
    "mfu",
    "save_pretrained",
]
