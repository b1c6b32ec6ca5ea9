"""Model + tokenizer for `Engine.from_pretrained`: a checkpoint directory, or the embedded demo model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ernie_platform.models import ErnieForCausalLM, ErnieModelArgs, cast_model, load_pretrained, load_tokenizer

log = logging.getLogger(__name__)

DEMO_PRESET = Path(__file__).resolve().parents[2] / "conf" / "model" / "ernie45_demo_moe.yaml"
# conf/model/ernie45_demo_moe.yaml, for installs without the conf/ tree
_DEMO_FALLBACK: dict[str, Any] = dict(
    vocab_size=384, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
    moe_num_experts=16, moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=1, moe_layer_start_index=1,
    moe_layer_end_index=-1, moe_layer_interval=1,
)  # fmt: skip
DEMO_SEED = 0  # every replica builds the same random demo weights (prefill and decode replicas must agree)


def demo_model_args() -> ErnieModelArgs:
    if DEMO_PRESET.is_file():
        import yaml

        d = yaml.safe_load(DEMO_PRESET.read_text())
        d = {k: v for k, v in d.items() if k not in ("defaults", "name", "path")}
    else:
        d = dict(_DEMO_FALLBACK)
    return ErnieModelArgs.from_mapping(d)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(path: Union[str, os.PathLike]) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def checkpoint_tokenizer(path: Optional[Union[str, os.PathLike]]) -> Any:
    """The tokenizer saved with the checkpoint at `path`, else (no path, or no tokenizer files) the built-in one."""
    return load_tokenizer(path if path and has_tokenizer(path) else None)


def load_model_and_tokenizer(
    path: Optional[Union[str, os.PathLike]],
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer). `path=None`: the demo MoE with random weights and the built-in tokenizer."""
    if path is None:
        log.warning(
            "inference: no model path given, serving the demo MoE (%s) with RANDOM weights and the built-in "
            "byte-level tokenizer; its output is noise",
            DEMO_PRESET.stem,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_SEED)
            model = ErnieForCausalLM(demo_model_args())
        if dtype is not None:
            cast_model(model, dtype)
        return model.to(device).eval(), load_tokenizer(None)
    model = load_pretrained(path, dtype=dtype, device=device)
    if not has_tokenizer(path):
        log.warning("inference: %s has no tokenizer files; using the built-in byte-level tokenizer", path)
    return model.eval(), checkpoint_tokenizer(path)
