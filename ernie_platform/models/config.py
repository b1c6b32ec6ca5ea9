"""Architecture and MoE-runtime configs for the ERNIE 4.5 text family.

`ErnieModelArgs` mirrors the fields of the published `config.json` files (`model_type` `ernie4_5` for the dense
0.3B and `ernie4_5_moe` for 21B-A3B / 300B-A47B) so that a checkpoint's config converts both ways without loss of
anything the forward uses. Field types are the plain ones OmegaConf understands, so the same dataclass is also the
Hydra schema of the `model` group (see `ernie_platform.configs`).

`MoEConfig` holds what is not part of a checkpoint: the expert-compute backend and the router-loss coefficients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

TEXT_MODEL_TYPES = ("ernie4_5", "ernie4_5_moe")  # config.json model_type of the text models (dense, MoE)
VL_MODEL_TYPES = ("ernie4_5_vl_moe",)

# Keys of a transformers config.json that are bookkeeping, not architecture: accepted and ignored on load.
_IGNORED_HF_KEYS = {
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "output_router_logits",
    "router_aux_loss_coef",
    "_name_or_path",
    "model_type",
    "rope_scaling",
    "rope_parameters",
    "rope_theta",
    "moe_capacity",
    "moe_gate",
    "moe_use_aux_free",
    "num_nextn_predict_layers",
    "use_rmsnorm",
    "is_quantized",
    "quantization_config",
    "compression_ratio",
    "use_flash_attention",
    "fuse_attn_ffn",
    "fuse_rope",
    "fuse_swiglu",
    "use_fast_ln",
    "weight_share_add_bias",
    "freq_allocation",
    "multi_token_pred_lambda",
    "generation_config",
    "tensor_parallel_degree",
    "tensor_parallel_rank",
    "sequence_parallel",
    "moe_group",
    "moe_multimodal_dispatch_use_allgather",
    "moe_layer_feed_forward",
    "use_moe",
    "moe_use_bpr",
    "moe_dropout_prob",
    "moe_aux_loss_lambda",
    "moe_z_loss_lambda",
    "moe_orthogonal_loss_lambda",
    "pretraining_tp",
    "attention_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
}


@dataclass
class ErnieModelArgs:
    """ERNIE 4.5 text architecture (dense when `moe_num_experts == 0`)."""

    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_bias: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: List[int] = field(default_factory=lambda: [2])
    # MoE (ignored when moe_num_experts == 0)
    moe_num_experts: int = 0
    moe_k: int = 2
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1: the last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.validate()

    # ---- derived -------------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def model_type(self) -> str:
        return "ernie4_5_moe" if self.is_moe else "ernie4_5"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def resolved_moe_layer_end_index(self) -> int:
        return self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Same placement rule as the published models: every `interval`-th layer within [start, end]."""
        return (
            self.is_moe
            and (layer_idx + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= layer_idx <= self.resolved_moe_layer_end_index
        )

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"model config: {name}={getattr(self, name)!r} {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", f"is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads", f"is not divisible by num_key_value_heads={self.num_key_value_heads}")
        if self.resolved_head_dim % 2:
            raise bad("head_dim", "must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "is not supported (ERNIE 4.5 uses silu)")
        if self.moe_num_experts < 0:
            raise bad("moe_num_experts", "must be >= 0")
        if self.is_moe:
            if not 1 <= self.moe_k <= self.moe_num_experts:
                raise bad("moe_k", f"must be in [1, moe_num_experts={self.moe_num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "must be positive for an MoE model")
            if self.moe_layer_interval <= 0:
                raise bad("moe_layer_interval", "must be positive")

    # ---- transformers config.json --------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ErnieModelArgs:
        """Build from a transformers/ERNIE `config.json` dict; unknown architecture keys are an error."""
        model_type = d.get("model_type")
        if model_type not in TEXT_MODEL_TYPES:
            raise ValueError(f"{source}: model_type={model_type!r} is not supported (expected ernie4_5/ernie4_5_moe)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif k not in _IGNORED_HF_KEYS:
                unknown.append(k)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {sorted(unknown)} for model_type={model_type}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if model_type == "ernie4_5":
            for k in [k for k in kwargs if k.startswith("moe_")]:
                kwargs.pop(k)
        else:
            # transformers' Ernie4_5_MoeConfig defaults for keys a config.json may omit
            kwargs.setdefault("moe_num_experts", 64)
            kwargs.setdefault("moe_k", 6)
            kwargs.setdefault("moe_intermediate_size", 1536)
            kwargs.setdefault("moe_num_shared_experts", 2)
            if isinstance(kwargs["moe_num_experts"], list) or isinstance(kwargs["moe_intermediate_size"], list):
                raise ValueError(f"{source}: list-valued moe_num_experts/moe_intermediate_size is the VL layout")
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers reads for this architecture (no trust_remote_code)."""
        d: dict[str, Any] = {
            "architectures": ["Ernie4_5_MoeForCausalLM" if self.is_moe else "Ernie4_5ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "use_bias": self.use_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "use_cache": True,
        }
        if self.is_moe:
            d.update(
                moe_num_experts=self.moe_num_experts,
                moe_k=self.moe_k,
                moe_intermediate_size=self.moe_intermediate_size,
                moe_num_shared_experts=self.moe_num_shared_experts,
                moe_layer_start_index=self.moe_layer_start_index,
                moe_layer_end_index=self.resolved_moe_layer_end_index,
                moe_layer_interval=self.moe_layer_interval,
                moe_norm_min=self.moe_norm_min,
            )
        return d

    @classmethod
    def from_mapping(cls, d: Any) -> ErnieModelArgs:
        """Build from a (possibly larger) mapping, e.g. the resolved Hydra `model` node; extra keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (list(v) if k == "eos_token_id" else v) for k, v in dict(d).items() if k in names})


@dataclass
class MoEConfig:
    """Runtime MoE settings: expert-compute backend and router losses (not stored in checkpoints)."""

    backend: str = "torch"  # torch | eager | megablocks (see ernie_platform/kernels/)
    aux_loss_coef: float = 0.01  # load-balancing loss E * sum_e f_e * P_e
    z_loss_coef: float = 0.0  # router z-loss, off by default
    orthogonal_loss_coef: float = 0.0  # ERNIE router orthogonal loss, off by default
    # Aux-loss-free balancing: after each training step bias += rate * sign(mean load - load); 0 disables.
    bias_update_rate: float = 0.0
    # Experts of each MoE layer split across this many ranks (kernels.expert_parallel); 1 = every rank holds all.
    expert_parallel_size: int = 1
    # Expert placement under expert parallelism (ernie_platform.balance, docs/balance.md): extra physical slots per
    # MoE layer for replicas of hot experts (slots = experts + this, divisible by expert_parallel_size) ...
    num_redundant_experts: int = 0
    # ... re-planned every this many optimizer steps from the loads routed since the last plan (0: never; the
    # placement then stays the identity, replicas of the first experts filling the extra slots) ...
    rebalance_interval: int = 0
    # ... by this ernie_platform.balance policy: hierarchical | global | traffic_aware.
    placement_policy: str = "hierarchical"
