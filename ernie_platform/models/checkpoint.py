"""Checkpoints in the transformers / published `baidu/ERNIE-4.5-*-PT` layout (safetensors only).

On disk the routed experts are stored one by one (`mlp.experts.{e}.{gate,up,down}_proj.weight`) and the router bias
as `mlp.moe_statics.e_score_correction_bias`; in memory they are stacked `w13_E2FD` (gate ‖ up) / `w2_EDF` and
`mlp.gate.e_score_correction_bias`. Loading never unpickles: `.bin`/`.pt` files are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ernie_platform.models.config import ErnieModelArgs, MoEConfig
from ernie_platform.models.ernie import ErnieForCausalLM

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_LEAVES = ("w13_E2FD", "w2_EDF")


def _expert_slot(stacked: dict[str, torch.Tensor], prefix: str, e: int, proj: str) -> torch.Tensor | None:
    """The view of expert `e`'s `proj` weight inside the stacked parameters of MoE layer `prefix` (None: no such)."""
    w13, w2 = stacked.get(f"{prefix}.w13_E2FD"), stacked.get(f"{prefix}.w2_EDF")
    if w13 is None or w2 is None or not 0 <= e < w13.shape[0]:
        return None
    f = w2.shape[-1]
    return {"gate_proj": w13[e, :f], "up_proj": w13[e, f:], "down_proj": w2[e]}[proj]
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Published checkpoints may carry multi-token-prediction heads that the causal LM does not use.
_IGNORED_PREFIXES = ("mtp", "model.mtp")


class CheckpointError(ValueError):
    """A checkpoint directory does not match the model it is loaded into."""


def check_keys(path: Union[str, os.PathLike], missing: list[str], unexpected: list[str]) -> None:
    """Raise a `CheckpointError` naming (up to 20 of) the missing and unexpected tensors, if any."""
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"missing tensors {missing[:20]}{' …' if len(missing) > 20 else ''}")
    if unexpected:
        parts.append(f"unexpected tensors {unexpected[:20]}{' …' if len(unexpected) > 20 else ''}")
    raise CheckpointError(f"{path}: " + "; ".join(parts))


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no config.json in checkpoint directory {path}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def _read_index(file: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file) of a sharded checkpoint's index, checked for shape."""
    try:
        index = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg} (a truncated download or a hand edit?)"
        ) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{file}: no "weight_map" object (tensor name -> shard file) in the index')
    bad = sorted({str(v) for v in weight_map.values() if not isinstance(v, str) or not v or Path(v).name != v})
    if bad:
        # Shards are files of the checkpoint directory itself; anything else is a damaged (or hostile) index.
        raise CheckpointError(f"{file}: weight_map names {bad[:5]}, which are not file names in {file.parent}")
    return weight_map


def weight_files(path: Union[str, os.PathLike]) -> list[Path]:
    """The safetensors files of the checkpoint directory `path`: every shard its index names, or `model.safetensors`.

    Checks only that the files exist (no tensor is read): `FileNotFoundError` naming what is missing, or
    `CheckpointError` for a malformed index."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        files = sorted(set(_read_index(path / INDEX_FILE).values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX_FILE} names shard(s) that do not exist in {path}: {missing}")
        return [path / f for f in files]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    unsafe = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {unsafe}: pickle-based weights are never loaded; convert them to safetensors)" if unsafe else ""
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open_safetensors(file: Path) -> Any:
    """`safe_open(file)`, with safetensors' bare header errors ("incomplete metadata, file not fully covered",
    "header too small" ...) turned into a `CheckpointError` that names the file and its size."""
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        detail = str(e).removeprefix("Error while deserializing header: ")
        size = file.stat().st_size
        raise CheckpointError(
            f"{file}: truncated or not a safetensors file ({detail}; {size:,} bytes on disk): re-download or "
            "re-export it"
        ) from None


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Any, Path]]:
    for file in files:
        with _open_safetensors(file) as f:
            for key in f.keys():
                yield key, f, file


def _keep_fp32(name: str) -> bool:
    # the routers (text model's mlp.gate, the VL pools' {text,vision}_moe.gate) and their correction biases
    return name.endswith((".gate.weight", "e_score_correction_bias"))


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters and persistent buffers to `dtype`, keeping the routers and score-correction biases in fp32.

    Non-persistent buffers (rotary frequencies, expert-load accumulators) are derived state and keep their dtype."""
    persistent = set(model.state_dict())
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name in persistent and p.is_floating_point() and not _keep_fp32(name):
            p.data = p.data.to(dtype)
    return model


def load_pretrained(
    path: Union[str, os.PathLike],
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    moe_cfg: Optional[MoEConfig] = None,
) -> ErnieForCausalLM:
    """Load a transformers-format ERNIE 4.5 (`ernie4_5` / `ernie4_5_moe`) directory.

    `dtype=None` keeps the dtype recorded in config.json (float32 when none is recorded).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    hf_cfg = _read_config(path)
    if dtype is None:
        dtype = _DTYPES.get(str(hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"), torch.float32)
    files = weight_files(path)
    if hf_cfg.get("model_type") == "ernie4_5_vl_moe":
        from ernie_platform.models.vl.checkpoint import load_vl_pretrained

        tensors = {key: handle.get_tensor(key) for key, handle, _ in _iter_tensors(files)}
        backend = moe_cfg.backend if moe_cfg is not None else None
        return load_vl_pretrained(path, hf_cfg, tensors, dtype, device, backend)
    args = ErnieModelArgs.from_hf_dict(hf_cfg, source=str(path / "config.json"))

    with torch.device(device):
        model = ErnieForCausalLM(args, moe_cfg)
    cast_model(model, dtype)
    targets = dict(model.named_parameters(remove_duplicate=True))
    targets.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    if args.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    filled: set[str] = set()
    unexpected: list[str] = []

    with torch.no_grad():
        for key, handle, file in _iter_tensors(files):
            if key.startswith(_IGNORED_PREFIXES) or (args.tie_word_embeddings and key == "lm_head.weight"):
                continue
            m = _EXPERT_KEY.match(key)
            if m:
                dst = _expert_slot(targets, m.group(1), int(m.group(2)), m.group(3))
            else:
                name = key.replace("mlp.moe_statics.e_score_correction_bias", "mlp.gate.e_score_correction_bias")
                dst = None if name.endswith(_EXPERT_LEAVES) else targets.get(name)
            if dst is None:
                unexpected.append(key)
                continue
            shape = tuple(handle.get_slice(key).get_shape())
            if shape != tuple(dst.shape):
                raise CheckpointError(
                    f"{file}: tensor {key} has shape {list(shape)} but the model expects {list(dst.shape)}"
                )
            dst.copy_(handle.get_tensor(key))
            filled.add(key)

    missing = [k for k in _expected_keys(model) if k not in filled]
    check_keys(path, missing, unexpected)
    model.eval()
    return model


def _expected_keys(model: ErnieForCausalLM) -> list[str]:
    keys = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue
        prefix, leaf = name.rsplit(".", 1)
        if leaf == "w13_E2FD":
            for e in range(t.shape[0]):
                keys += [f"{prefix}.experts.{e}.{proj}.weight" for proj in _EXPERT_PROJS]
        elif leaf != "w2_EDF":
            keys.append(name.replace("mlp.gate.e_score_correction_bias", "mlp.moe_statics.e_score_correction_bias"))
    return keys


def hf_state_dict(model: ErnieForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under the published checkpoint names (experts unstacked, tied head dropped)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue
        prefix, _, leaf = name.rpartition(".")
        if leaf in _EXPERT_LEAVES:
            if leaf == "w13_E2FD":
                f = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{prefix}.experts.{e}.gate_proj.weight"] = t[e, :f].detach().clone().contiguous()
                    out[f"{prefix}.experts.{e}.up_proj.weight"] = t[e, f:].detach().clone().contiguous()
            else:
                for e in range(t.shape[0]):
                    out[f"{prefix}.experts.{e}.down_proj.weight"] = t[e].detach().clone().contiguous()
        else:
            key = name.replace("mlp.gate.e_score_correction_bias", "mlp.moe_statics.e_score_correction_bias")
            out[key] = t.detach().clone().contiguous()
    return out


def save_pretrained(
    model: ErnieForCausalLM,
    path: Union[str, os.PathLike],
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`) that transformers loads.

    The directory is assembled beside `path` and swapped in at the end, so an interrupted save never replaces a
    good checkpoint with a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from ernie_platform.models.vl.model import ErnieVLForConditionalGeneration

    is_vl = isinstance(model, ErnieVLForConditionalGeneration)
    if is_vl:
        from ernie_platform.models.vl.checkpoint import vl_config_json, vl_hf_state_dict

        tensors = {k: v.cpu() for k, v in vl_hf_state_dict(model).items()}
    else:
        tensors = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k in sorted(tensors):
            nbytes = tensors[k].numel() * tensors[k].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = tensors[k]
            size += nbytes
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if is_vl:
            (tmp / "config.json").write_text(vl_config_json(model))
        else:
            cfg = model.args.to_hf_dict()
            cfg["dtype"] = str(model.model.embed_tokens.weight.dtype).replace("torch.", "")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            gen = {
                "bos_token_id": model.args.bos_token_id,
                "eos_token_id": cfg["eos_token_id"],
                "pad_token_id": model.args.pad_token_id,
            }
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
