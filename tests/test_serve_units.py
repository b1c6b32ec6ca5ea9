"""Serving pieces without Ray: request validation, chat formatting, reasoning split, SSE framing, response assembly,
config resolution and the importable application."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ernie_platform.models import load_tokenizer
from ernie_platform.serving import chat as chatfmt
from ernie_platform.serving import responses as R
from ernie_platform.serving.app import deployment_options, latest_export, model_name_for, resolve_serve_config
from ernie_platform.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_sampling,
    completion_sampling,
    parse_body,
    thinking_requested,
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(None)


def _body(**kw: Any) -> bytes:
    return json.dumps({"model": "m", **kw}).encode()


def _err(fn: Any, *a: Any) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*a)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    return e.value


# ---- request validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b"", None, "invalid_json"),
        (b"{oops", None, "invalid_json"),
        (b"[1]", None, "invalid_json"),
        (b'{"prompt": "x"}', "model", "missing_required_parameter"),
        (_body(prompt="x", n="2"), "n", "invalid_type"),
        (_body(prompt="x", n=1.5), "n", "invalid_type"),
        (_body(prompt="x", temperature="hot"), "temperature", "invalid_type"),
        (_body(prompt="x", stream=1), "stream", "invalid_type"),
        (_body(prompt=[1, "a"]), "prompt", "invalid_type"),
        (_body(prompt="x", stream_options={"include_usage": "yes"}), "stream_options.include_usage", "invalid_type"),
    ],
)
def test_parse_body_rejects_malformed_and_mistyped(raw: bytes, param: str | None, code: str) -> None:
    e = _err(parse_body, raw, CompletionRequest)
    assert (e.status, e.param, e.code) == (400, param, code)


def test_parse_body_accepts_openai_shapes_and_extras() -> None:
    r = parse_body(_body(prompt=[[1, 2], [3]], temperature=1, top_k=5, some_future_field=True), CompletionRequest)
    assert r.prompt == [[1, 2], [3]] and r.temperature == 1.0 and r.top_k == 5
    c = parse_body(_body(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3), ChatRequest)
    assert c.max_completion_tokens == 3


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (dict(temperature=2.1), "temperature"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(n=0), "n"),
        (dict(n=9), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=-2), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(stop=["a", ""]), "stop"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(frequency_penalty=3.0), "frequency_penalty"),
        (dict(logit_bias={"1": 2.0}), "logit_bias"),
        (dict(min_tokens=2), "min_tokens"),  # vLLM's extensions: refused by name by the native engine, not ignored
        (dict(repetition_penalty=1.2), "repetition_penalty"),
        (dict(min_p=0.1), "min_p"),
        (dict(stop_token_ids=[5]), "stop_token_ids"),
        (dict(allowed_token_ids=[5, 6]), "allowed_token_ids"),
        (dict(logprobs=21), "logprobs"),
        (dict(echo=True, logprobs=1), "echo"),
        (dict(best_of=3), "best_of"),
        (dict(suffix="x"), "suffix"),
        (dict(stream_options={"include_usage": True}), "stream_options"),
    ],
)
def test_completion_ranges(fields: dict, param: str) -> None:
    req = parse_body(_body(prompt="x", **fields), CompletionRequest)
    e = _err(completion_sampling, req, 8)
    assert (e.status, e.param) == (400, param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(logit_bias={"x": 1.0}), "logit_bias"),
        (dict(logit_bias={"999": 1.0}), "logit_bias"),  # outside the vocabulary of 320
        (dict(logit_bias={"1": 101.0}), "logit_bias"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_tokens=17), "min_tokens"),  # above max_tokens (16 by default)
        (dict(min_tokens=-1), "min_tokens"),
        (dict(stop_token_ids=[320]), "stop_token_ids"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
    ],
)
def test_vllm_fields_are_range_checked(fields: dict, param: str) -> None:
    req = parse_body(_body(prompt="x", **fields), CompletionRequest)
    e = _err(completion_sampling, req, 8, "vllm", 320)
    assert (e.status, e.param) == (400, param)


def test_vllm_fields_reach_the_vllm_backend_by_vllms_names() -> None:
    fields = dict(presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"7": -100}, repetition_penalty=1.1,
                  min_p=0.05, min_tokens=3, stop_token_ids=[2], allowed_token_ids=[5, 6, 7])  # fmt: skip
    req = parse_body(_body(prompt="x", **fields), CompletionRequest)
    extra = completion_sampling(req, 8, "vllm", 320).params.extra
    assert extra == {**fields, "logit_bias": {7: -100.0}}
    neutral = dict(presence_penalty=0, frequency_penalty=0, repetition_penalty=1.0, min_p=0, min_tokens=0)
    assert completion_sampling(parse_body(_body(prompt="x", **neutral), CompletionRequest), 8).params.extra == {}


def test_sampling_params_from_requests() -> None:
    req = parse_body(_body(prompt="x", temperature=0, top_k=-1, stop="END", seed=3, n=2, logprobs=0, stream=True,
                           stream_options={"include_usage": True}, ignore_eos=True), CompletionRequest)  # fmt: skip
    s = completion_sampling(req, 8)
    p = s.params
    assert (p.max_tokens, p.temperature, p.top_k, p.stop, p.seed, p.n, p.logprobs, p.ignore_eos) == (
        16, 0.0, 0, ["END"], 3, 2, 0, True)  # fmt: skip
    assert s.stream and s.include_usage and not s.return_token_ids
    chat = parse_body(_body(messages=[], logprobs=True, top_logprobs=4, max_tokens=9, max_completion_tokens=5),
                      ChatRequest)  # fmt: skip
    c = chat_sampling(chat, 8)
    assert (c.params.logprobs, c.params.max_tokens) == (4, 5)  # max_completion_tokens wins
    assert chat_sampling(parse_body(_body(messages=[], logprobs=True), ChatRequest), 8).params.logprobs == 0
    assert chat_sampling(parse_body(_body(messages=[]), ChatRequest), 8).params.logprobs is None
    for bad, param in (
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(tools=[{"type": "function"}]), "tools"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(max_completion_tokens=0), "max_completion_tokens"),
    ):
        assert _err(chat_sampling, parse_body(_body(messages=[], **bad), ChatRequest), 8).param == param


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({}, None),
        ({"chat_template_kwargs": {"enable_thinking": True}}, True),
        ({"chat_template_kwargs": {"enable_thinking": False}}, False),
        ({"metadata": {"enable_thinking": "true"}}, True),
        ({"metadata": {"enable_thinking": "false"}}, False),
    ],
)
def test_thinking_switch(fields: dict, want: bool | None) -> None:
    assert thinking_requested(parse_body(_body(messages=[], **fields), ChatRequest)) is want


def test_thinking_switch_rejects_non_booleans() -> None:
    req = parse_body(_body(messages=[], metadata={"enable_thinking": "maybe"}), ChatRequest)
    assert _err(thinking_requested, req).param == "metadata.enable_thinking"


# ---- chat formatting -------------------------------------------------------------------------------------------
CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    {"role": "assistant", "content": None},
    {"role": "developer", "content": "Use English."},
    {"role": "user", "content": "Why?"},
]
ERNIE_TEXT = ("<|begin_of_sentence|>Be brief.\nUser: Hi there\nAssistant: <|end_of_sentence|>Use English.\n"
              "User: Why?\nAssistant: ")  # fmt: skip


def test_ernie_chat_format_with_and_without_a_template(tok: Any) -> None:
    msgs = chatfmt.normalize_messages(CONVO)
    assert chatfmt.render_chat(tok, msgs, enable_thinking=False) == ERNIE_TEXT  # the tokenizer's own template
    bare = load_tokenizer(None)
    bare.chat_template = None  # a checkpoint tokenizer without a template: ERNIE's format is the fallback
    assert chatfmt.render_chat(bare, msgs, enable_thinking=False) == ERNIE_TEXT
    assert chatfmt.render_chat(bare, msgs, enable_thinking=True) == ERNIE_TEXT + "<think>\n"
    ids = chatfmt.encode_chat(tok, ERNIE_TEXT)
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_sentence|>") and tok.decode(ids) == ERNIE_TEXT


def test_a_template_that_knows_thinking_decides_itself(tok: Any) -> None:
    t = load_tokenizer(None)
    t.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                       "{% if enable_thinking %}<think>{% else %}<think></think>{% endif %}")  # fmt: skip
    msgs = [{"role": "user", "content": "q"}]
    assert chatfmt.render_chat(t, msgs, enable_thinking=True) == "q<think>"
    assert chatfmt.render_chat(t, msgs, enable_thinking=False) == "q<think></think>"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}],
         "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_bad_messages(messages: list, param: str) -> None:
    e = _err(chatfmt.normalize_messages, messages)
    assert e.param == param


def test_images_on_a_text_model_are_refused() -> None:
    e = _err(chatfmt.normalize_messages, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert e.code == "unsupported_content" and "vision-language" in e.message and "text-only" in e.message


def _png_url(size: tuple[int, int] = (28, 28)) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(url: Any) -> dict:
    return {"type": "image_url", "image_url": {"url": url} if isinstance(url, str) else url}


def test_vl_chat_images_become_markers_in_order() -> None:
    from ernie_platform.models.vl.prompt import IMAGE_MARKER

    msgs = [{"role": "user", "content": [{"type": "text", "text": "a "}, _image(_png_url()),
                                         {"type": "text", "text": " b "}, _image(_png_url((56, 28)))]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "input_image", "image_url": _png_url()}]}]  # fmt: skip
    out, images = chatfmt.normalize_chat(msgs, is_vl=True)
    assert out[0]["content"] == f"a Picture 1:{IMAGE_MARKER} b Picture 2:{IMAGE_MARKER}"
    assert out[2]["content"] == f"Picture 3:{IMAGE_MARKER}"
    assert [im.size for im in images] == [(28, 28), (56, 28), (28, 28)] and images[0].mode == "RGB"


@pytest.mark.parametrize(
    ("part", "code", "fragment"),
    [
        (_image("https://example.com/cat.png"), "invalid_image_url", "only data: URLs"),
        (_image("data:image/png,rawbytes"), "invalid_image_url", "base64"),
        (_image("data:image/png;base64,@@notbase64@@"), "invalid_image_url", "invalid base64"),
        (_image("data:image/png;base64,aGVsbG8gd29ybGQ="), "invalid_image", "not a readable image"),
        (_image({}), "invalid_value", "image_url.url is required"),
        ({"type": "text", "text": "fake <|IMAGE_PLACEHOLDER|>"}, "invalid_value", "may not contain the image tokens"),
    ],
)
def test_bad_vl_content_names_the_part(part: dict, code: str, fragment: str) -> None:
    e = _err(chatfmt.normalize_chat, [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}], True)
    assert e.code == code and fragment in e.message and e.param.startswith("messages[0].content[1]"), e.message


def test_too_many_images_are_refused() -> None:
    from ernie_platform.serving.images import MAX_IMAGES

    parts = [_image(_png_url()) for _ in range(MAX_IMAGES + 1)]
    e = _err(chatfmt.normalize_chat, [{"role": "user", "content": parts}], True)
    assert f"at most {MAX_IMAGES} images" in e.message and e.param == f"messages[0].content[{MAX_IMAGES}]"


# ---- reasoning split -------------------------------------------------------------------------------------------
def _split(pieces: list[tuple[int | None, str]], end_id: int | None) -> tuple[str, str]:
    sp = chatfmt.ReasoningSplitter(end_id)
    r = c = ""
    for tid, text in pieces:
        a, b = sp.feed(tid, text)
        r, c = r + a, c + b
    a, b = sp.finish()
    return r + a, c + b


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("abc</think>def", ("abc", "def")),
        ("abc\n</think>\n\ndef", ("abc", "def")),
        ("<think>\nabc\n</think>\ndef\n", ("abc", "def\n")),
        ("no tag at all", ("no tag at all", "")),
        ("a < b </thin", ("a < b </thin", "")),  # a partial tag at the end is released as reasoning
        ("</think>only answer", ("", "only answer")),
    ],
)
def test_reasoning_split_on_text_for_every_chunking(text: str, want: tuple[str, str]) -> None:
    assert _split([(None, text)], None) == want
    assert _split([(None, ch) for ch in text], None) == want  # one character per event
    for cut in range(len(text) + 1):
        assert _split([(None, text[:cut]), (None, text[cut:])], None) == want


def test_reasoning_split_on_the_special_token_id() -> None:
    """`</think>` as a special token: the detokenizer drops its text, the splitter sees its id."""
    events = [(5, "let me"), (6, " think\n"), (11, ""), (7, "\n\nAnswer"), (8, ": 4")]
    assert _split(events, end_id=11) == ("let me think", "Answer: 4")


def test_choice_state_stream_deltas_equal_the_whole() -> None:
    toks = [R.Tok(0, 1, "<th"), R.Tok(0, 2, "ink>why"), R.Tok(0, 3, "\n</th"), R.Tok(0, 4, "ink>\n"),
            R.Tok(0, 5, "because", finish_reason="stop")]  # fmt: skip
    whole = R.ChoiceState(0, 3, chatfmt.ReasoningSplitter(None))
    whole.add(toks)
    streamed = R.ChoiceState(0, 3, chatfmt.ReasoningSplitter(None))
    deltas = [streamed.add([t]) for t in toks]
    assert (whole.reasoning, whole.text) == ("why", "because")
    assert "".join(d.reasoning for d in deltas) == "why" and "".join(d.text for d in deltas) == "because"
    assert deltas[-1].finish_reason == "stop" and whole.finish_reason == "stop"


# ---- SSE and response bodies -----------------------------------------------------------------------------------
def test_sse_framing() -> None:
    assert R.sse({"a": 1, "t": "é\n"}) == 'data: {"a":1,"t":"é\\n"}\n\n'
    assert R.DONE == "data: [DONE]\n\n"


def test_response_bodies() -> None:
    toks = [R.Tok(0, 10, "Hel", -0.1, {"Hel": -0.1, "x": -2.0}, None, "Hel"),
            R.Tok(0, 11, "lo", -0.2, {"lo": -0.2}, "length", "lo")]  # fmt: skip
    c = R.ChoiceState(0, 4)
    c.add(toks)
    body = R.completion_response("cmpl-1", "m", [c], 4, want_logprobs=True, token_ids=True, echoes=["Say "])
    ch = body["choices"][0]
    assert ch["text"] == "Say Hello" and ch["finish_reason"] == "length" and ch["token_ids"] == [10, 11]
    assert ch["logprobs"]["tokens"] == ["Hel", "lo"] and ch["logprobs"]["text_offset"] == [4, 7]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    chat = R.chat_response("chatcmpl-1", "m", [c], 4, want_logprobs=True, token_ids=False)
    msg = chat["choices"][0]
    assert msg["message"] == {"role": "assistant", "content": "Hello"} and "token_ids" not in msg
    lp = msg["logprobs"]["content"][0]
    assert lp["token"] == "Hel" and lp["bytes"] == list(b"Hel") and [t["token"] for t in lp["top_logprobs"]] == [
        "Hel", "x"]  # fmt: skip
    d = R.Delta(text="", toks=[])
    assert R.chat_delta_chunk("i", 0, "m", c, d, False, False, False) is None  # nothing visible: no chunk
    assert R.usage_chunk("i", 0, "m", "chat.completion.chunk", 4, 2)["choices"] == []


# ---- config resolution and the importable app ------------------------------------------------------------------
def _export(root: Path, run: str, model_type: str, mtime: float) -> Path:
    d = root / run / "export"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    os.utime(d / "config.json", (mtime, mtime))
    return d


def test_latest_export_picks_the_newest_servable(tmp_path: Path) -> None:
    now = time.time()
    assert latest_export(str(tmp_path)) is None
    _export(tmp_path, "old-text", "ernie4_5_moe", now - 100)
    newer = _export(tmp_path, "new-text", "ernie4_5_moe", now - 10)
    _export(tmp_path, "newest-other", "llama", now)
    assert latest_export(str(tmp_path)) == newer
    newest_mm = _export(tmp_path, "newest-mm", "ernie4_5_vl_moe", now + 10)
    assert latest_export(str(tmp_path)) == newest_mm  # VL exports are served too
    assert latest_export("s3://bucket/runs") is None
    assert model_name_for(str(newer)) == "new-text"
    assert model_name_for("/ckpt/ERNIE-4.5-0.3B-PT") == "ERNIE-4.5-0.3B-PT" and model_name_for(None) == "ernie45-demo"


def test_build_app_and_resolution_without_ray(tmp_path: Path) -> None:
    from workloads.serve.app import _overrides, build_app, compose_config

    assert _overrides({"serve": {"mode": "pd", "model_name": None}, "serve.retries": 0, "x": True}) == [
        "serve.mode=pd", "serve.model_name=null", "serve.retries=0", "x=true"]  # fmt: skip
    cfg = compose_config({"run.storage_path": str(tmp_path), "serve.engine.max_seq_len": 99999})
    plain = resolve_serve_config(cfg)
    r = plain["serve"]["resolved"]
    assert r["model_path"] is None and r["model_name"] == "ernie45-demo"
    assert r["max_seq_len"] == 4096  # capped at the demo model's max_position_embeddings
    assert r["replicas"] == {"prefill": 1, "engine": 1}
    with pytest.raises(ValueError, match="serve.mode='both'"):
        resolve_serve_config(compose_config({"serve.mode": "both", "run.storage_path": str(tmp_path)}))
    with pytest.raises(ValueError, match="serve.max_n"):
        resolve_serve_config(compose_config({"serve.max_n": 64, "run.storage_path": str(tmp_path)}))
    app = build_app({"run.storage_path": str(tmp_path), "serve.mode": "colocated"})
    assert type(app).__name__ == "Application"
    import workloads.serve.app as module

    assert type(module.app).__name__ == "Application"  # built on first access from the default config


def test_deployment_options() -> None:
    auto = {"enabled": False, "min_replicas": 1, "max_replicas": 4, "initial_replicas": None,
            "target_ongoing_requests": 16.0, "upscale_delay_s": 10.0, "downscale_delay_s": 300.0}  # fmt: skip
    node = {"num_replicas": 2, "max_ongoing_requests": 64, "autoscaling_config": auto,
            "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0, "memory": None, "resources": {}}}  # fmt: skip
    o = deployment_options(node, "Decode", 5.0)
    assert o["num_replicas"] == 2 and o["ray_actor_options"] == {"num_cpus": 0.5} and "autoscaling_config" not in o
    node["autoscaling_config"]["enabled"] = True
    node["ray_actor_options"].update(num_gpus=1.0, resources={"accel": 1.0})
    o = deployment_options(node, "Decode", 5.0)
    assert "num_replicas" not in o and o["autoscaling_config"]["max_replicas"] == 4
    assert "initial_replicas" not in o["autoscaling_config"] and "enabled" not in o["autoscaling_config"]
    assert o["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0, "resources": {"accel": 1.0}}


# ---- the engine replica without Serve ---------------------------------------------------------------------------
def test_prefill_replica_batches_concurrent_prompts_like_one_by_one(tmp_path: Path) -> None:
    """Concurrent `prefill` calls on a prefill replica share batched forwards; each result equals its own
    `Engine.prefill` (first token and KV), and an invalid prompt fails alone."""
    import asyncio

    import torch

    from ernie_platform.inference import SamplingParams
    from ernie_platform.models import ErnieForCausalLM, ErnieModelArgs, save_pretrained
    from ernie_platform.serving.engine_server import EngineServer

    torch.manual_seed(0)
    args = ErnieModelArgs(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=4, moe_k=2,
                          moe_intermediate_size=32, initializer_range=0.3)  # fmt: skip
    ckpt = save_pretrained(ErnieForCausalLM(args).eval(), tmp_path / "m", tokenizer=load_tokenizer(None))
    cfg = {"max_batch_size": 4, "max_seq_len": 64, "kv_budget_tokens": None, "dtype": None, "device": "cpu",
           "torch_threads": 1, "max_n": 2}  # fmt: skip
    server = EngineServer("prefill", str(ckpt), cfg)
    prompts = [[16 + i for i in range(n)] for n in (3, 9, 17, 5)]
    params = [SamplingParams(max_tokens=4, temperature=0, n=1 + i % 2) for i in range(len(prompts))]

    sizes: list[int] = []
    batched = server.engine.prefill_batch

    def recording(ps: list, sps: list, mms: Any = None) -> list:
        sizes.append(len(ps))
        return batched(ps, sps, mms)

    server.engine.prefill_batch = recording

    async def run(calls: list) -> list[Any]:
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        results = asyncio.run(run([server.prefill(p, sp) for p, sp in zip(prompts, params)]))
        assert sizes == [len(prompts)]  # one forward for the four
        # a prompt too long for max_seq_len=64 fails alone; its batch-mate still gets its result
        good, bad = asyncio.run(run([server.prefill(prompts[0], params[0]),
                                     server.prefill([16] * 70, SamplingParams(max_tokens=4))]))  # fmt: skip
        assert isinstance(bad, ValueError) and "max_seq_len=64" in str(bad)
        assert good.firsts[0].token_id == results[0].firsts[0].token_id
        for p, sp, got in zip(prompts, params, results):
            alone = server.engine.prefill(p, sp)
            assert [e.token_id for e in got.firsts] == [e.token_id for e in alone.firsts]
            assert got.prompt_ids == p and len(got.sampler_state) == sp.n
            for (k1, v1), (k2, v2) in zip(got.kv, alone.kv):
                assert k1.shape == k2.shape == (2, len(p), 16)
                torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    finally:
        server.__del__()


def test_engine_replica_coalesces_tokens_of_concurrent_streams_only(tiny_moe_ckpt) -> None:
    """serve.engine.stream_interval_ms: with two streams on the replica each message carries the tokens of up to one
    interval (fewer hops per token); a stream alone gets every step's token at once (no ITL cost at low load)."""
    import asyncio

    from ernie_platform.inference import SamplingParams
    from ernie_platform.serving.engine_server import EngineServer

    cfg = {"max_batch_size": 4, "max_seq_len": 64, "kv_budget_tokens": None, "dtype": None, "device": "cpu",
           "torch_threads": 1, "max_n": 2, "stream_interval_ms": 150}  # fmt: skip
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def stream(server: EngineServer, rid: str) -> list[tuple[float, int]]:
        return [(time.perf_counter(), len(toks)) async for toks in server.generate(rid, [16, 17, 18], params)]

    async def run() -> tuple[list, list]:
        server = EngineServer("colocated", str(tiny_moe_ckpt), cfg)
        try:
            alone = await stream(server, "a")
            a, b = await asyncio.gather(stream(server, "b"), stream(server, "c"))
            return alone, [a, b]
        finally:
            server.__del__()

    alone, pair = asyncio.run(run())
    assert sum(k for _, k in alone) == 24 and len(alone) >= 12  # about one message per step
    for msgs in pair:
        assert sum(k for _, k in msgs) == 24
        assert len(msgs) < 12  # several tokens per message
        gaps = [t1 - t0 for (t0, _), (t1, _) in zip(msgs, msgs[1:-1])]
        assert all(g >= 0.14 for g in gaps), gaps  # at most one message per interval, the last one aside
