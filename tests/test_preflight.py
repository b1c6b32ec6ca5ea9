"""The drivers check what they can before Ray starts and before an MLflow run is opened: wrong paths (naming the
config key and value) and, for post-training, the tokenizer's chat template. Fast: Ray is never started (its
`init` and the MLflow run are replaced by tripwires)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import ray
from omegaconf import OmegaConf

import ernie_platform.training.job as job
from ernie_platform.models.tokenizer import CHAT_TEMPLATE
from ernie_platform.posttrain import job as post_job
from ernie_platform.posttrain.policy import PolicyStart, check_chat_template, ensure_chat_template, load_policy
from ernie_platform.training.preflight import ConfigPathError, check_paths
from tests.conftest import compose_config


@pytest.fixture()
def no_ray_no_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tripwires: starting Ray or opening the MLflow run fails the test (instead of running a job)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def ray_init(*_: Any, **__: Any) -> None:
        raise AssertionError("Ray was started")

    def open_run(*_: Any, **__: Any) -> None:
        raise AssertionError("the MLflow run was opened")

    monkeypatch.setattr(ray, "init", ray_init)
    monkeypatch.setattr(job, "open_run", open_run)


def _plain(*overrides: str) -> dict[str, Any]:
    return OmegaConf.to_container(compose_config(*overrides), resolve=True)  # type: ignore[return-value]


# ---- pretraining -----------------------------------------------------------------------------------------------------


def _bad_paths(tmp: Path, ckpt: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir()
    no_weights = tmp / "no_weights"
    no_weights.mkdir()
    shutil.copy(ckpt / "config.json", no_weights / "config.json")
    (tmp / "a_file").write_text("x")
    good = tmp / "good.jsonl"
    good.write_text('{"text": "hi"}\n')
    return [
        (["model.path=/no/such/dir"], r"model\.path=/no/such/dir: no config\.json there \(no such directory\)"),
        ([f"model.path={empty}"], rf"model\.path={empty}: no config\.json there"),
        ([f"model.path={tmp / 'a_file'}"], r"model\.path=.*a_file: a file, not a checkpoint directory"),
        ([f"model.path={no_weights}"], r"model\.path=.*no_weights: .*no model\.safetensors or model\.safetensors\."),
        (["+stage=long", f"stage.init_from={empty}"], rf"stage\.init_from={empty}: no config\.json there"),
        (["data.source=/no/such/file.jsonl"], r"data\.source=/no/such/file\.jsonl: '/no/such/file\.jsonl' does not"),
        ([f"data.source={tmp}/*.parquet"], r"data\.source=.*\*\.parquet: .* matches no .*jsonl.* files"),
        ([f"data.source='{good},/no/such.jsonl'"], r"data\.source=.*good\.jsonl,/no/such\.jsonl: '/no/such\.jsonl'"),
    ]


def test_pretrain_bad_path_fails_before_ray_and_mlflow(
    tmp_path: Path, tiny_moe_ckpt: Path, no_ray_no_mlflow: None
) -> None:
    was_initialized = ray.is_initialized()
    storage = tmp_path / "runs"
    for overrides, message in _bad_paths(tmp_path, tiny_moe_ckpt):
        cfg = compose_config("model=ernie45_tiny_moe", f"run.storage_path={storage}", *overrides)
        with pytest.raises(ConfigPathError, match=message):
            job.run_pretraining(cfg)
    assert ray.is_initialized() == was_initialized
    assert not (storage / "mlflow.db").exists(), "an MLflow store was created"


def test_check_paths_accepts_what_the_jobs_accept(tmp_path: Path, tiny_moe_ckpt: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    check_paths(_plain("model=ernie45_tiny_moe", f"model.path={tiny_moe_ckpt}", f"data.source={data}"))
    check_paths(_plain(f"data.source={tmp_path}", f"run.storage_path={tmp_path}"))  # a directory of files
    check_paths(_plain(f"data.source='{tmp_path}/*.jsonl,s3://bucket/more/*.jsonl'"))  # URIs: left to the readers
    check_paths(_plain("model.path=s3://bucket/ckpt"))
    # A stage whose previous export is not there trains from scratch (training.stages): not an error.
    check_paths(_plain("+stage=long", f"run.storage_path={tmp_path}"))
    check_paths(_plain("+stage=long", f"stage.init_from={tiny_moe_ckpt}"))


# ---- post-training -------------------------------------------------------------------------------------------------


def test_posttrain_bad_paths_fail_before_ray(tmp_path: Path, no_ray_no_mlflow: None) -> None:
    was_initialized = ray.is_initialized()  # (a shared test instance may be up; nothing here may start one)
    for overrides, message in [
        (["model.path=/no/such/dir"], r"model\.path=/no/such/dir: no config\.json there \(no such directory\)"),
        (["algo.eval_source=/no/eval.jsonl"], r"algo\.eval_source=/no/eval\.jsonl: '/no/eval\.jsonl' does not"),
        (["data.source=/no/train.jsonl"], r"data\.source=/no/train\.jsonl: '/no/train\.jsonl' does not exist"),
    ]:
        cfg = compose_config("+algo=sft", f"run.storage_path={tmp_path}", *overrides)
        with pytest.raises(ConfigPathError, match=message):
            post_job.run_posttraining(cfg)
    # upo_pair_source is read by UPO only
    check_paths(_plain("+algo=sft", "algo.upo_pair_source=/no/pairs.jsonl"))
    with pytest.raises(ConfigPathError, match=r"algo\.upo_pair_source=/no/pairs\.jsonl"):
        check_paths(_plain("+algo=upo", "algo.upo_pair_source=/no/pairs.jsonl"))
    assert ray.is_initialized() == was_initialized


@pytest.fixture()
def base_ckpt(tmp_path: Path, tiny_moe_ckpt: Path) -> Path:
    """The tiny MoE checkpoint as many base checkpoints ship: a tokenizer without a chat template."""
    path = shutil.copytree(tiny_moe_ckpt, tmp_path / "base")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return path


def _capture_run_train_job(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def run_train_job(plain: dict[str, Any], loop: Any, line: str, **kw: Any) -> dict[str, Any]:
        seen.update(plain=plain, line=line)
        return {}

    monkeypatch.setattr(post_job, "run_train_job", run_train_job)
    return seen


@pytest.mark.parametrize("algo", ["sft", "dpo", "rlvr", "upo"])
def test_base_checkpoint_gets_the_ernie_template(
    algo: str,
    base_ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    no_ray_no_mlflow: None,
) -> None:
    was_initialized = ray.is_initialized()
    seen = _capture_run_train_job(monkeypatch)
    cfg = compose_config(f"+algo={algo}", f"model.path={base_ckpt}", f"run.storage_path={tmp_path}")
    post_job.run_posttraining(cfg)
    assert ray.is_initialized() == was_initialized
    plain = seen["plain"]
    # recorded for the MLflow run (the resolved config's params) and said in the log
    assert plain["algo"]["chat_template_source"] == "ernie45"
    assert "has no chat template" in capsys.readouterr().out and "ERNIE 4.5's" in seen["line"]
    # what the Ray Train workers then load renders conversations with ERNIE 4.5's template
    start = PolicyStart(str(base_ckpt), "")
    _, tokenizer = load_policy(plain, start)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "1+1?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_sentence|>User: 1+1?\nAssistant: "


def test_checkpoint_template_is_kept(tiny_moe_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_run_train_job(monkeypatch)
    cfg = compose_config("+algo=sft", f"model.path={tiny_moe_ckpt}", f"run.storage_path={tmp_path}")
    post_job.run_posttraining(cfg)
    assert seen["plain"]["algo"]["chat_template_source"] == "checkpoint"
    demo = check_chat_template(PolicyStart(None, ""))  # no model.path and no export: the demo model
    assert demo.source == "builtin"


def test_non_ernie_checkpoint_without_template_fails_at_once(
    base_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray_no_mlflow: None
) -> None:
    cfg_file = base_ckpt / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "llama"}))
    seen = _capture_run_train_job(monkeypatch)
    cfg = compose_config("+algo=sft", f"model.path={base_ckpt}", f"run.storage_path={tmp_path}")
    with pytest.raises(ValueError, match=rf"model\.path={base_ckpt}: its tokenizer has no chat template") as err:
        post_job.run_posttraining(cfg)
    assert f"add a `chat_template` to {base_ckpt}/tokenizer_config.json" in str(err.value)
    assert "model_type='llama'" in str(err.value) and not seen
    # the workers' own check says the same
    from ernie_platform.inference.loading import checkpoint_tokenizer

    with pytest.raises(ValueError, match="its tokenizer has no chat template"):
        ensure_chat_template(checkpoint_tokenizer(base_ckpt), PolicyStart(str(base_ckpt), ""))


def test_vl_checkpoint_fails_at_once(base_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = base_ckpt / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "ernie4_5_vl_moe"}))
    seen = _capture_run_train_job(monkeypatch)
    cfg = compose_config("+algo=sft", f"model.path={base_ckpt}", f"run.storage_path={tmp_path}")
    with pytest.raises(ValueError, match="a VL checkpoint; post-training supports text models"):
        post_job.run_posttraining(cfg)
    assert not seen
