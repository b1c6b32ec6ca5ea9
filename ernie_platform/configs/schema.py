"""Typed Hydra schema of the platform configuration.

The YAML tree under `conf/` is composed on top of these dataclasses (registered in Hydra's ConfigStore by
`register_configs`), so an unknown key or a value of the wrong type is rejected at compose time with Hydra's own
error. Architecture *validation* (divisibility, MoE ranges, ...) is `ErnieModelArgs.validate`, which runs when the
`model` node is turned into an `ErnieModelArgs` by `to_model_args`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ernie_platform.configs.posttrain import AlgoConfig, check_algo
from ernie_platform.models.config import ErnieModelArgs, MoEConfig

if TYPE_CHECKING:
    from ernie_platform.models.vl.model import ErnieVLConfig

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "MoEConfig",
    "PhaseConfig",
    "RunConfig",
    "ServeActorOptions",
    "ServeAutoscalingConfig",
    "ServeConfig",
    "ServeDeploymentConfig",
    "ServeEngineConfig",
    "ServeVLLMConfig",
    "StageConfig",
    "TrainerConfig",
    "VisionSchema",
    "register_configs",
    "to_model_args",
    "to_vl_config",
    "validate_config",
]


@dataclass
class VisionSchema:
    """Vision tower of an ERNIE-4.5-VL model (`model.vision`); field names follow `VisionConfig`."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6


@dataclass
class ModelConfig(ErnieModelArgs):
    """Schema of the `model` group: the architecture plus where it comes from.

    A VL (ERNIE-4.5-VL) model sets `vision`; its text side is the ErnieModelArgs fields, with
    `moe_intermediate_size` the text-expert width and `moe_intermediate_size_vision` the vision-expert width
    (`to_vl_config` builds the `ErnieVLConfig`). `vision: null` (the default) is a text-only model and the VL-only
    fields below are then ignored.
    """

    name: str = "ernie45_demo_moe"
    # Checkpoint directory (transformers layout). When set, the architecture is read from its config.json and the
    # architecture fields of this node are ignored.
    path: Optional[str] = None
    # ---- VL only (ignored when vision is None) ----
    vision: Optional[VisionSchema] = None
    moe_intermediate_size_vision: int = 0
    mrope_section: List[int] = field(default_factory=lambda: [22, 22, 20])  # [h, w, t] rotary pairs
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307


@dataclass
class TrainerConfig:
    max_steps: int = 20  # optimizer steps
    num_workers: int = 2  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    micro_batch_size: int = 8  # sequences per worker per micro-step
    seq_len: int = 128  # packed text sequence length
    grad_accum_steps: int = 1
    zero_stage: int = 2  # DeepSpeed ZeRO stage (0-3)
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine (warm-up + cosine decay) | wsd (warm-up, stable, decay)
    min_lr_ratio: float = 0.1  # decay floor as a fraction of lr
    warmup_steps: int = 5
    decay_fraction: float = 0.2  # wsd: share of max_steps spent in the final linear decay
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 1  # metrics to MLflow / progress line every N steps
    checkpoint_every: int = 10  # Ray Train checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # Ray Train CheckpointConfig.num_to_keep
    max_failures: int = 1  # Ray Train FailureConfig.max_failures (worker-group restarts from the last checkpoint)
    eval_every: int = 0  # held-out evaluation every N steps (0 = only at the end)
    # Peak FLOP/s of one worker for MFU; 0 = auto: 65 GFLOP/s per CPU core (fp32 matmul measured on the 2-core dev
    # machine, docs/benchmarks.md) or 989 TFLOP/s per GPU (H100 dense bf16).
    peak_tflops: float = 0.0
    seed: int = 0
    # Fault injection for tests and drills: rank `fail_rank` kills its own process (SIGKILL) when it reaches this
    # step, once per run (a marker file under the run directory remembers that it happened).
    fail_at_step: Optional[int] = None
    fail_rank: int = 0


@dataclass
class DataConfig:
    # "builtin" (generated corpus / synthetic image-text set, no download), or files: a path, directory, glob or
    # pyarrow/fsspec URI (s3://, gs://, ...) of .jsonl / .json / .parquet files; several separated by commas.
    source: str = "builtin"
    format: str = "auto"  # auto (from the file extension) | jsonl | parquet
    text_key: str = "text"  # field holding a text record's document
    on_error: str = "raise"  # raise (fail with file and line) | skip (drop the record and count it)
    shuffle: bool = True  # reshuffle the record order every epoch (seeded by trainer.seed and the epoch)
    builtin_docs: int = 20000  # documents in the built-in text corpus
    builtin_vl_samples: int = 20000  # samples in the built-in image-text train split
    heldout_samples: int = 128  # built-in image-text held-out samples for the answer-accuracy metric
    image_size: int = 56  # built-in image side (a multiple of patch_size * spatial_merge_size)


@dataclass
class PhaseConfig:
    """A sub-phase of a stage: the first `fraction` of the remaining steps train only the `train` groups."""

    name: str = "all"
    fraction: float = 1.0  # share of trainer.max_steps
    # Parameter groups that learn in this phase: all | text | vision | resampler | vision_experts. The others are
    # frozen (learning rate 0 for their optimizer group).
    train: List[str] = field(default_factory=lambda: ["all"])


@dataclass
class StageConfig:
    name: Optional[str] = None  # text | long | mm (conf/stage/*.yaml); None outside a staged run
    # Export of the previous stage to start from; used when it exists, otherwise the stage starts from scratch.
    init_from: Optional[str] = None
    rope_theta: Optional[float] = None  # RoPE base to train with (raised for long context); None keeps the model's
    phases: List[PhaseConfig] = field(default_factory=list)  # empty: one phase training everything
    # Learning-rate multiplier per parameter group (text | vision | resampler | vision_experts) in every phase; a
    # freshly initialised ViT, for one, loses the colour/shape features of its random init at the LM's rate.
    lr_scale: Dict[str, float] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "ernie45-demo"
    storage_path: str = "./runs"  # any local path or pyarrow/fsspec URI (s3://, gs://, ...)
    experiment: str = "ernie45-pretrain"  # MLflow experiment; the MLflow run is named run.name


@dataclass
class ServeVLLMConfig:
    """`serve.engine.vllm`: settings of the vLLM backend (`serve.engine.backend=vllm`, docs/serving.md)."""

    kv_cache_gib: int = 1  # CPU: KV cache per replica in GiB (VLLM_CPU_KVCACHE_SPACE)
    # CPU: VLLM_CPU_OMP_THREADS_BIND; null keeps vLLM's default (auto: one OpenMP thread per physical core, pinned),
    # nobind leaves placement to the OS (several replicas on one small machine), or core lists such as "0-1".
    omp_threads_bind: Optional[str] = None
    enforce_eager: bool = False  # true: no torch.compile (starts in seconds instead of about a minute, decodes slower)
    gpu_memory_utilization: float = 0.9  # GPU: fraction of the device's memory vLLM may take
    engine_args: Dict[str, Any] = field(default_factory=dict)  # any other vllm.AsyncEngineArgs field, applied last


@dataclass
class ServeEngineConfig:
    """`serve.engine`: the `Engine` each prefill / decode / colocated replica builds (docs/inference.md)."""

    max_batch_size: int = 32  # KV pool rows = sequences decoded together
    max_seq_len: int = 2048  # prompt + max_tokens per sequence (capped at the model's max_position_embeddings)
    kv_budget_tokens: Optional[int] = None  # None: max_batch_size * max_seq_len
    dtype: Optional[str] = None  # None (checkpoint/fp32) | float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda (then give the deployment ray_actor_options.num_gpus)
    torch_threads: int = 1  # intra-op threads per replica; 1 is fastest for small models on CPU
    # With several streams on an engine replica, each stream's tokens go out at most every this many ms, several per
    # message: fewer hops per token through Serve, the ingress and the proxy, which is most of the serving path's
    # per-token cost (docs/benchmarks.md). A lone stream is never held (no ITL cost at low load). 0: every step's
    # tokens as soon as they are ready. 50 is Ray Serve LLM's default (RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS).
    stream_interval_ms: float = 50.0
    # native: the platform's engine (every mode, text and VL) | vllm: vLLM's AsyncLLM in the Engine replicas
    # (serve.mode=colocated, text checkpoints; needs the vllm extra, docs/serving.md)
    backend: str = "native"
    vllm: ServeVLLMConfig = field(default_factory=ServeVLLMConfig)


@dataclass
class ServeAutoscalingConfig:
    """Ray Serve `autoscaling_config` of a deployment; `enabled: false` uses the fixed `num_replicas`."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: Optional[int] = None
    target_ongoing_requests: float = 16.0  # per replica; above it Serve adds replicas
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0


@dataclass
class ServeActorOptions:
    """Ray actor options of each replica of a deployment."""

    num_cpus: float = 0.5
    num_gpus: float = 0.0
    memory: Optional[int] = None  # bytes
    resources: Dict[str, float] = field(default_factory=dict)  # custom Ray resources


@dataclass
class ServeDeploymentConfig:
    """One Ray Serve deployment (`serve.ingress`, `serve.prefill`, `serve.decode`, `serve.colocated`)."""

    num_replicas: int = 1  # ignored when autoscaling_config.enabled
    autoscaling_config: ServeAutoscalingConfig = field(default_factory=ServeAutoscalingConfig)
    # Serve's default (5) would cap a decode replica at 5 concurrent streams; continuous batching wants many.
    max_ongoing_requests: int = 256
    ray_actor_options: ServeActorOptions = field(default_factory=ServeActorOptions)


@dataclass
class ServeConfig:
    """`python -m workloads.serve`: Ray Serve app with an OpenAI-compatible API (docs/serving.md)."""

    mode: str = "pd"  # pd (ingress -> prefill -> decode replicas) | colocated (one engine deployment)
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "ernie"
    route_prefix: str = "/"
    model_name: Optional[str] = None  # None: the checkpoint directory's name, or "ernie45-demo"
    # File holding the Bearer key (e.g. a mounted Secret); None: the ERNIE_API_KEY environment variable, else no auth.
    # There is deliberately no `api_key` field: Hydra writes config values to outputs/ (ernie_platform/serving/auth.py).
    api_key_file: Optional[str] = None
    metrics_require_key: bool = False  # /metrics behind the key too (default: open, for scrapers)
    # Request bodies above this are refused with 413 (from Content-Length before reading, else while reading).
    max_request_bytes: int = 4 * 2**20
    # Prompts tokenized at once per ingress replica (off the event loop, in a thread pool of that size).
    max_concurrent_tokenizations: int = 2
    disagg_min_prompt_tokens: int = 32  # pd mode: shorter prompts prefill on the decode replica
    max_n: int = 8  # largest `n` a request may ask for
    default_max_tokens: int = 256  # chat requests without max_tokens (capped by the context left)
    retries: int = 1  # re-run a request whose engine replica died before anything was sent to the client
    # Serve's direct gRPC transport for the token streams (handle `_by_reference=False`, and the HTTP proxy's
    # RAY_SERVE_PROXY_USE_GRPC when this process starts Ray); false: Ray's object-store path everywhere.
    grpc_transport: bool = True
    graceful_shutdown_timeout_s: float = 5.0
    # Request routing over engine replicas (docs/balance.md, "Request routing"): load = power of two choices by
    # load (prefill: queued prompt tokens; decode/colocated: running + waiting sequences and KV usage) from the
    # replicas' reports every routing_stats_period_s; pow2 = Ray Serve's default (ongoing requests per replica).
    router: str = "load"
    routing_stats_period_s: float = 1.0
    engine: ServeEngineConfig = field(default_factory=ServeEngineConfig)
    ingress: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(
            max_ongoing_requests=512, ray_actor_options=ServeActorOptions(num_cpus=0.25)
        )
    )
    prefill: ServeDeploymentConfig = field(default_factory=ServeDeploymentConfig)
    decode: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(ray_actor_options=ServeActorOptions(num_cpus=1.0))
    )
    colocated: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(ray_actor_options=ServeActorOptions(num_cpus=1.0))
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)  # post-training (`+algo=`); unused by pretraining


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent): `config_schema` (root), `model/model_schema` and
    `serve/serve_schema`."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="serve", name="serve_schema", node=ServeConfig)


def to_model_args(cfg_model: Any) -> ErnieModelArgs:
    """The validated `ErnieModelArgs` of a composed `model` node (DictConfig, ModelConfig or plain mapping).

    `name` and `path` are dropped; resolving `path` (reading the checkpoint's config.json) is the model loader's job.
    """
    if isinstance(cfg_model, DictConfig):
        cfg_model = OmegaConf.to_container(cfg_model, resolve=True)
    elif dataclasses.is_dataclass(cfg_model) and not isinstance(cfg_model, type):
        cfg_model = dataclasses.asdict(cfg_model)
    return ErnieModelArgs.from_mapping(cfg_model)


def _plain(cfg_model: Any) -> dict[str, Any]:
    if isinstance(cfg_model, DictConfig):
        return dict(OmegaConf.to_container(cfg_model, resolve=True))  # type: ignore[arg-type]
    if dataclasses.is_dataclass(cfg_model) and not isinstance(cfg_model, type):
        return dataclasses.asdict(cfg_model)
    return dict(cfg_model)


_VL_TOKEN_KEYS = (
    "image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_token_id",
    "video_start_token_id",
    "video_end_token_id",
)


def to_vl_config(cfg_model: Any) -> ErnieVLConfig:
    """The `ErnieVLConfig` of a composed VL `model` node (DictConfig, ModelConfig or plain mapping).

    Text side: the ErnieModelArgs fields (validated as for a text model); `mlp_layer_types` from
    moe_layer_start_index / end / interval (`ErnieModelArgs.is_moe_layer`), `moe_intermediate_size` =
    [moe_intermediate_size, moe_intermediate_size_vision]. Vision side: `vision`. Resampler: both.
    """
    from ernie_platform.models.vl.model import ErnieVLConfig
    from ernie_platform.models.vl.text import VLTextArgs
    from ernie_platform.models.vl.vision import ResamplerConfig, VisionConfig

    d = _plain(cfg_model)
    name = d.get("name", "<model>")
    vision = d.get("vision")
    if vision is None:
        raise ValueError(f"model config {name}: model.vision is null, so this is a text-only model (no VL config)")
    if dataclasses.is_dataclass(vision) and not isinstance(vision, type):
        vision = dataclasses.asdict(vision)
    vision = {**dataclasses.asdict(VisionSchema()), **dict(vision)}
    args = ErnieModelArgs.from_mapping(d)
    if not args.is_moe:
        raise ValueError(f"model config {name}: moe_num_experts={args.moe_num_experts} (a VL model needs MoE layers)")
    f_vision = int(d.get("moe_intermediate_size_vision", 0))
    if f_vision <= 0:
        raise ValueError(
            f"model config {name}: moe_intermediate_size_vision={f_vision} must be positive for a VL model"
        )
    types = ["sparse" if args.is_moe_layer(i) else "dense" for i in range(args.num_hidden_layers)]
    if "sparse" not in types:
        raise ValueError(
            f"model config {name}: moe_layer_start_index/moe_layer_end_index/moe_layer_interval="
            f"{args.moe_layer_start_index}/{args.moe_layer_end_index}/{args.moe_layer_interval} place no MoE layer"
        )
    text = VLTextArgs(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.resolved_head_dim,
        rms_norm_eps=args.rms_norm_eps,
        rope_theta=args.rope_theta,
        mrope_section=list(d.get("mrope_section", [22, 22, 20])),
        use_bias=args.use_bias,
        tie_word_embeddings=args.tie_word_embeddings,
        pad_token_id=args.pad_token_id,
        moe_num_experts=args.moe_num_experts,
        moe_k=args.moe_k,
        moe_intermediate_size=[args.moe_intermediate_size, f_vision],
        moe_num_shared_experts=args.moe_num_shared_experts,
        moe_norm_min=args.moe_norm_min,
        mlp_layer_types=types,
    )
    vcfg = VisionConfig(
        depth=int(vision["depth"]),
        hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]),
        num_heads=int(vision["num_heads"]),
        in_channels=int(vision["in_channels"]),
        patch_size=int(vision["patch_size"]),
        spatial_merge_size=int(vision["spatial_merge_size"]),
        hidden_act=str(vision["hidden_act"]),
        layer_norm_eps=float(vision["layer_norm_eps"]),
    )
    resampler = ResamplerConfig(
        vision_hidden_size=vcfg.hidden_size,
        text_hidden_size=args.hidden_size,
        spatial_merge_size=vcfg.spatial_merge_size,
        temporal_merge_size=int(vision["temporal_merge_size"]),
        vision_layer_norm_eps=vcfg.layer_norm_eps,
        text_rms_norm_eps=args.rms_norm_eps,
    )
    tokens = {k: int(d[k]) for k in _VL_TOKEN_KEYS if k in d}
    for k, v in tokens.items():
        if not 0 <= v < args.vocab_size:
            raise ValueError(f"model config {name}: {k}={v} is outside the vocabulary (vocab_size={args.vocab_size})")
    return ErnieVLConfig(text, vcfg, resampler, tie_word_embeddings=args.tie_word_embeddings, **tokens)


def _unknown_keys(node: DictConfig, prefix: str) -> list[str]:
    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    out: list[str] = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if fields is not None and key not in fields:
            out.append(full)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out.extend(_unknown_keys(child, f"{full}."))
    return out


def validate_config(cfg: DictConfig) -> None:
    """Checks Hydra's compose leaves out; call before a job starts.

    Composition already rejects unknown keys and wrong types of plain overrides (`trainer.bogus=1`,
    `trainer.max_steps=abc`). Hydra's append syntax (`+trainer.bogus=1`) bypasses the schema by design, so keys
    added that way are rejected here; then the model node goes through `ErnieModelArgs.validate`.
    """
    unknown = _unknown_keys(cfg, "")
    if unknown:
        raise ValueError(f"config: unknown keys {unknown} (not in the schema, see ernie_platform/configs/schema.py)")
    to_model_args(cfg.model)
    if cfg.model.get("vision") is not None:
        to_vl_config(cfg.model)
    _check_choices(cfg)


PARAM_GROUPS = ("all", "text", "vision", "resampler", "vision_experts")


def _check_choices(cfg: DictConfig) -> None:
    def bad(key: str, value: Any, allowed: Any) -> ValueError:
        return ValueError(f"config: {key}={value!r} is not valid (expected {allowed})")

    t, data, stage = cfg.trainer, cfg.data, cfg.stage
    check_algo(cfg.algo, t)
    if t.lr_schedule not in ("cosine", "wsd"):
        raise bad("trainer.lr_schedule", t.lr_schedule, "cosine or wsd")
    if data.on_error not in ("raise", "skip"):
        raise bad("data.on_error", data.on_error, "raise or skip")
    if data.format not in ("auto", "jsonl", "parquet"):
        raise bad("data.format", data.format, "auto, jsonl or parquet")
    for key in ("max_steps", "num_workers", "micro_batch_size", "seq_len", "grad_accum_steps", "cpus_per_worker"):
        if t[key] < 1:
            raise bad(f"trainer.{key}", t[key], "an integer >= 1")
    if not 0.0 <= t.decay_fraction <= 1.0:
        raise bad("trainer.decay_fraction", t.decay_fraction, "a fraction in [0, 1]")
    total = 0.0
    for i, phase in enumerate(stage.phases):
        unknown = [g for g in phase.train if g not in PARAM_GROUPS]
        if unknown or not phase.train:
            raise bad(f"stage.phases[{i}].train", list(phase.train), f"a non-empty list of {list(PARAM_GROUPS)}")
        if not 0.0 < phase.fraction <= 1.0:
            raise bad(f"stage.phases[{i}].fraction", phase.fraction, "a fraction in (0, 1]")
        total += phase.fraction
    if total > 1.0 + 1e-9:
        raise bad("stage.phases[*].fraction", total, "fractions that sum to at most 1")
    for group, scale in (stage.get("lr_scale") or {}).items():
        if group not in PARAM_GROUPS[1:]:
            raise bad("stage.lr_scale", group, f"a parameter group of {list(PARAM_GROUPS[1:])}")
        if scale < 0:
            raise bad(f"stage.lr_scale.{group}", scale, "a multiplier >= 0")
    vl_only = [g for p in stage.phases for g in p.train if g in ("vision", "resampler", "vision_experts")]
    vl_only += [g for g in (stage.get("lr_scale") or {}) if g in ("vision", "resampler", "vision_experts")]
    if vl_only and cfg.model.get("vision") is None:
        raise ValueError(
            f"config: stage.phases / stage.lr_scale name {sorted(set(vl_only))} but model {cfg.model.name} "
            "has no vision"
        )
    ep = cfg.moe.expert_parallel_size
    if ep > 1:
        if t.num_workers % ep:
            raise bad("moe.expert_parallel_size", ep, f"a divisor of trainer.num_workers={t.num_workers}")
        if t.zero_stage != 0:
            raise ValueError(
                f"config: moe.expert_parallel_size={ep} needs trainer.zero_stage=0 (got {t.zero_stage}): expert "
                "shards are reduced by kernels.expert_parallel.allreduce_gradients, not by ZeRO's partitioned buffers"
            )
    moe = cfg.moe
    if moe.num_redundant_experts < 0:
        raise bad("moe.num_redundant_experts", moe.num_redundant_experts, "an integer >= 0")
    if moe.rebalance_interval < 0:
        raise bad("moe.rebalance_interval", moe.rebalance_interval, "an integer >= 0 (0: never)")
    from ernie_platform.balance import POLICIES

    if moe.placement_policy not in POLICIES:
        raise bad("moe.placement_policy", moe.placement_policy, " | ".join(POLICIES))
    if (moe.num_redundant_experts or moe.rebalance_interval) and ep == 1:
        key = "moe.num_redundant_experts" if moe.num_redundant_experts else "moe.rebalance_interval"
        raise bad(key, moe[key.split(".")[1]], "0 unless moe.expert_parallel_size > 1 (placement is an EP setting)")
    slots = int(cfg.model.get("moe_num_experts") or 0) + moe.num_redundant_experts
    if ep > 1 and slots % ep:
        raise bad(
            "moe.num_redundant_experts",
            moe.num_redundant_experts,
            f"a value making moe_num_experts + it ({slots}) divisible by moe.expert_parallel_size={ep}",
        )
