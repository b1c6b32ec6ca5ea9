"""Checkpoint loading errors name what is wrong; saving never leaves a partial checkpoint in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_platform.models import CheckpointError, ErnieForCausalLM, ErnieModelArgs, load_pretrained, save_pretrained

ARGS = ErnieModelArgs(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
    moe_num_shared_experts=1,
)


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return save_pretrained(ErnieForCausalLM(ARGS), tmp_path / "ckpt")


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_layout_is_the_published_one(ckpt: Path) -> None:
    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.weight" in keys
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in keys
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in keys
    assert "lm_head.weight" not in keys  # tied
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "ernie4_5_moe" and cfg["moe_num_experts"] == 4


def test_missing_tensor_is_named(ckpt: Path) -> None:
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.experts.2.up_proj.weight'\]"):
        load_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt: Path) -> None:
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.0.mlp.extra.weight'\]"):
        load_pretrained(ckpt)


def test_misshaped_tensor_names_key_and_both_shapes(ckpt: Path) -> None:
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape \[16, 32\] but the model expects \[32, 32\]"):
        load_pretrained(ckpt)


def test_extra_expert_is_unexpected(ckpt: Path) -> None:
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.1.mlp.experts.4.up_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(CheckpointError, match="experts.4.up_proj"):
        load_pretrained(ckpt)


def test_pickle_weights_are_refused(tmp_path: Path, ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle-based weights are never loaded"):
        load_pretrained(ckpt)


def test_config_errors(ckpt: Path) -> None:
    cfg_file = ckpt / "config.json"
    good = cfg_file.read_text()
    cfg_file.write_text('{\n  "model_type": "ernie4_5_moe",\n  oops\n}')
    with pytest.raises(ValueError, match=r"config.json:3:3: invalid JSON"):
        load_pretrained(ckpt)
    cfg_file.write_text(json.dumps({**json.loads(good), "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama' is not supported"):
        load_pretrained(ckpt)
    cfg_file.write_text(json.dumps({**json.loads(good), "hidden_sise": 3}))
    with pytest.raises(ValueError, match="unknown config keys \\['hidden_sise'\\]"):
        load_pretrained(ckpt)
    cfg_file.write_text(json.dumps({**json.loads(good), "moe_k": 9}))
    with pytest.raises(ValueError, match="moe_k=9"):
        load_pretrained(ckpt)


def test_failed_save_keeps_previous_checkpoint(ckpt: Path) -> None:
    before = load_file(str(ckpt / "model.safetensors"))

    class BrokenTokenizer:
        def save_pretrained(self, path: str) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(ErnieForCausalLM(ARGS), ckpt, tokenizer=BrokenTokenizer())
    after = load_file(str(ckpt / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_bf16_load_keeps_router_fp32(ckpt: Path) -> None:
    model = load_pretrained(ckpt, dtype=torch.bfloat16)
    blk = model.moe_blocks()[0]
    assert blk.gate.weight.dtype == torch.float32 and blk.gate.e_score_correction_bias.dtype == torch.float32
    assert blk.w13_E2FD.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = model(torch.randint(3, 64, (1, 5)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert json.loads(save_pretrained(model, ckpt.parent / "bf16").joinpath("config.json").read_text())[
        "dtype"
    ] == "bfloat16"
    assert load_pretrained(ckpt.parent / "bf16").model.embed_tokens.weight.dtype == torch.bfloat16


# ---- damaged files: the error names the file and what is wrong ------------------------------------------------------


def test_truncated_safetensors_is_named(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download or copy
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or not a safetensors file") as err:
        load_pretrained(ckpt)
    assert str(weights) in str(err.value) and "incomplete metadata" in str(err.value)
    assert f"{len(data) // 2:,} bytes on disk" in str(err.value)


def test_not_a_safetensors_file_is_named(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"<html>404 Not Found</html>")  # a saved error page
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or not a safetensors file \(header"):
        load_pretrained(ckpt)


@pytest.fixture()
def sharded(tmp_path: Path) -> Path:
    path = save_pretrained(ErnieForCausalLM(ARGS), tmp_path / "sharded", max_shard_bytes=16 * 1024)
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 2
    return path


def test_sharded_checkpoint_loads(sharded: Path) -> None:
    load_pretrained(sharded)


def test_malformed_index_names_file_line_and_column(sharded: Path) -> None:
    index = sharded / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])  # cut mid-file
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json:\d+:\d+: invalid JSON") as err:
        load_pretrained(sharded)
    assert str(index) in str(err.value)
    index.write_text('{\n  "metadata": {},\n  "weight_map": {"a": "model-00001-of-00009.safetensors",}\n}')
    with pytest.raises(CheckpointError, match=r"index\.json:3:58: invalid JSON: Expecting property name"):
        load_pretrained(sharded)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r'index\.json: no "weight_map" object'):
        load_pretrained(sharded)
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"weight_map names \['../elsewhere.safetensors'\], which are not file"):
        load_pretrained(sharded)


def test_missing_shard_is_named(sharded: Path) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json names shard\(s\) that do not exist .*'{shard.name}'"):
        load_pretrained(sharded)


def test_truncated_shard_is_named(sharded: Path) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated or not a safetensors file"):
        load_pretrained(sharded)
