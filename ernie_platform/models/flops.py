"""Parameter and FLOP accounting for ERNIE 4.5 configs (no weights needed), for MFU and published-size checks.

Counts are analytic from `ErnieModelArgs` and agree with the built module's parameter count (tested).
"active" is what one token touches: every dense weight, the router, the shared experts and `moe_k` routed experts.
"non_embedding" leaves out the input embedding table (and an untied output head): the convention the published
model names (e.g. "21B-A3B") follow, since a table lookup does no matmul work.
"""

from __future__ import annotations

from dataclasses import dataclass

from ernie_platform.models.config import ErnieModelArgs


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    embedding: int  # input table + untied output head
    total_non_embedding: int
    active_non_embedding: int


def attention_params(hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool) -> int:
    """q/k/v/o projections of one grouped-query attention layer."""
    weights = hidden * head_dim * (2 * n_heads + 2 * n_kv_heads)
    return weights + ((head_dim * (n_heads + 2 * n_kv_heads) + hidden) if bias else 0)


def swiglu_params(hidden: int, width: int, bias: bool) -> int:
    """gate/up/down projections of one SwiGLU MLP of the given width."""
    return 3 * hidden * width + ((2 * width + hidden) if bias else 0)


def count_params(args: ErnieModelArgs) -> ParamCounts:
    d, bias = args.hidden_size, args.use_bias
    attn = attention_params(d, args.resolved_head_dim, args.num_attention_heads, args.num_key_value_heads, bias)
    norms = 2 * d

    def swiglu(f: int, with_bias: bool) -> int:
        return swiglu_params(d, f, with_bias)

    total = active = 0
    for i in range(args.num_hidden_layers):
        layer = attn + norms
        total += layer
        active += layer
        if args.is_moe_layer(i):
            router = args.moe_num_experts * d
            expert = swiglu(args.moe_intermediate_size, False)
            shared = swiglu(args.moe_intermediate_size * args.moe_num_shared_experts, bias)
            shared = shared if args.moe_num_shared_experts else 0
            total += router + args.moe_num_experts * expert + shared
            active += router + args.moe_k * expert + shared
        else:
            total += swiglu(args.intermediate_size, bias)
            active += swiglu(args.intermediate_size, bias)
    embedding = args.vocab_size * d
    head = 0 if args.tie_word_embeddings else args.vocab_size * d
    head_bias = args.vocab_size if (bias and args.is_moe) else 0
    final_norm = d
    non_emb_total = total + final_norm + head_bias
    non_emb_active = active + final_norm + head_bias
    return ParamCounts(
        total=non_emb_total + embedding + head,
        active=non_emb_active + embedding + head,
        embedding=embedding + head,
        total_non_embedding=non_emb_total,
        active_non_embedding=non_emb_active,
    )


def flops_per_token(args: ErnieModelArgs, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token: 2·(active weights incl. output head) + attention scores/values, ×3 for training."""
    counts = count_params(args)
    matmul_params = counts.active_non_embedding + args.vocab_size * args.hidden_size  # the output head
    attn = 2 * 2 * args.num_hidden_layers * args.num_attention_heads * args.resolved_head_dim * seq_len
    forward = 2 * matmul_params + attn
    return float(3 * forward if training else forward)


def mfu(args: ErnieModelArgs, tokens_per_second: float, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation of a training run."""
    return tokens_per_second * flops_per_token(args, seq_len, training=True) / peak_flops
