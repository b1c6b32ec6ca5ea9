"""Shared by the serving tests over HTTP (native and vLLM backends): checkpoints named `ckpt` served with
max_seq_len 256, so the bad-input matrix below gets the same answers from every app."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import torch

MODEL = "ckpt"  # derived from the checkpoint directory's name
TIMEOUT = 120.0
SHORT, LONG = "Hi", "The quick brown fox jumps over the lazy dog."  # 2 and 44 tokens: local vs disaggregated prefill
PARITY = dict(temperature=0, max_tokens=8, extra_body={"return_token_ids": True})  # stops at EOS, as transformers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: Any, key: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def hf_greedy(ckpt: Path, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(ids) :].tolist()


def stream_text(stream: Any) -> tuple[str, list[Any]]:
    chunks = list(stream)
    text = ""
    for c in chunks:
        for ch in c.choices:
            text += (ch.text if hasattr(ch, "text") else ch.delta.content) or ""
    return text, chunks


BAD = [  # (body or raw bytes, expected status, expected param or None)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "n": "2"}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x" * 300}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 256}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "n": 100}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": [[1, 2], [999999]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
]
BAD_CHAT = [
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
     400, "messages[0].content[1]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, 400, "presence_penalty"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "chat_template_kwargs": {"enable_thinking": "maybe"}}, 400, "chat_template_kwargs.enable_thinking"),
]  # fmt: skip


def assert_error(status: int, body: Any, want_status: int, param: str | None) -> None:
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], body
    if param is not None:
        assert err["param"] == param, body


async def sse_outcome(ac: openai.AsyncOpenAI, args: dict) -> str:
    """A streamed completion read off the wire: "ok" when it ends with `data: [DONE]` after all its tokens
    (`max_tokens`, finish_reason "length"), "error:event" when its last event before `[DONE]` is an error object;
    anything else (a stream cut short, silently or without `[DONE]`) is reported as what it is."""
    events: list[str] = []
    async with ac.completions.with_streaming_response.create(stream=True, **args) as resp:
        async for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    if not events or events[-1] != "[DONE]":
        return f"truncated: no [DONE] after {len(events)} events"
    payloads = [json.loads(e) for e in events[:-1]]
    if payloads and "error" in payloads[-1]:
        return "error:event"
    toks = sum(len(c.get("token_ids") or []) for p in payloads for c in p.get("choices", []))
    finish = [c.get("finish_reason") for p in payloads for c in p.get("choices", []) if c.get("finish_reason")]
    if toks == args["max_tokens"] and finish == ["length"]:
        return "ok"
    return f"truncated: {toks}/{args['max_tokens']} tokens, finish {finish}, then [DONE] without an error"


def kill_replica_under_load(base_url: str, app: str, deployment: str, prompt: str, recover_s: float) -> None:
    """Kill one replica of `deployment` while 12 requests run (a quarter non-streamed, the rest streamed and read off
    the wire): each must complete or fail cleanly (an HTTP error, or an SSE error event then `[DONE]`), none may hang
    or be cut short silently; then Serve's replacement replica must serve again within `recover_s`."""
    import asyncio
    import time

    import ray
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    victim = handle.actor_name.remote().result(timeout_s=TIMEOUT)
    outcomes: list[str] = []
    args = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=200, extra_body={"ignore_eos": True})
    stream_args = {**args, "extra_body": {"ignore_eos": True, "return_token_ids": True}}

    async def run() -> None:
        ac = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)

        async def one(i: int) -> str:
            try:
                if i % 4 == 0:
                    r = await ac.completions.create(**args)
                    return "ok" if r.usage.completion_tokens == 200 else "short"
                return await sse_outcome(ac, stream_args)
            except openai.APITimeoutError:
                return "hung"
            except openai.APIStatusError as e:  # an HTTP error before the stream started
                return f"error:{e.status_code}"
            except openai.APIError as e:  # the connection broke: not a clean end either
                return f"broken:{type(e).__name__}"

        async def killer() -> None:
            await asyncio.sleep(1.0)  # the streams are running
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

        try:
            outcomes.extend(await asyncio.gather(*(one(i) for i in range(12)), killer()))
        finally:
            await ac.close()

    t0 = time.time()
    asyncio.run(run())
    outcomes = [o for o in outcomes if o is not None]
    print(f"\n[kill] outcomes: {sorted(outcomes)}")
    assert len(outcomes) == 12, outcomes
    assert all(o == "ok" or o.startswith("error:") for o in outcomes), outcomes
    assert time.time() - t0 < TIMEOUT
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
    deadline = time.time() + recover_s
    while True:  # Serve replaces the replica; the first requests may still land on the dead one
        try:
            r = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
            break
        except openai.APIStatusError:
            assert time.time() < deadline, "the app did not recover"
            time.sleep(1.0)
    assert len(r.choices[0].token_ids) == 8
    assert handle.actor_name.remote().result(timeout_s=TIMEOUT) != victim


def check_models_health_and_greedy_parity(base_urls: list[str], clients: list[openai.OpenAI], ckpt: Path) -> None:
    """Each app lists the model and is healthy; its greedy completions (a short and a long prompt) and a chat answer
    equal transformers' `generate` on the checkpoint (each reference computed once for all the apps)."""
    from ernie_platform.models import load_tokenizer
    from ernie_platform.serving.chat import encode_chat, render_chat

    tok = load_tokenizer(ckpt)
    for url, c in zip(base_urls, clients):
        assert [m.id for m in c.models.list().data] == [MODEL]
        with urllib.request.urlopen(f"{url}/health", timeout=TIMEOUT) as r:
            assert json.loads(r.read())["status"] == "ok"
    for prompt in (SHORT, LONG):
        ref = hf_greedy(ckpt, tok.encode(prompt), 8)
        for url, c in zip(base_urls, clients):
            r = c.completions.create(model=MODEL, prompt=prompt, **PARITY)
            assert r.choices[0].token_ids == ref, (url, prompt)
            assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
            assert r.choices[0].finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
            assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == len(ref)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LONG}]
    ids = encode_chat(tok, render_chat(tok, messages, enable_thinking=False))
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = hf_greedy(ckpt, ids, 8)
    for c in clients:
        r = c.chat.completions.create(model=MODEL, messages=messages, **PARITY)
        assert r.choices[0].token_ids == ref and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(ids)


def check_streamed_equals_non_streamed(c: openai.OpenAI) -> None:
    """Greedy streamed completions and chat concatenate to the non-streamed text, with usage last and the finish
    reason on the last choice chunk."""
    args = dict(model=MODEL, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    for prompt in (SHORT, LONG):
        whole = c.completions.create(prompt=prompt, **args).choices[0].text
        text, chunks = stream_text(c.completions.create(prompt=prompt, stream=True,
                                                        stream_options={"include_usage": True}, **args))  # fmt: skip
        assert text == whole
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
        assert [ch.finish_reason for ch in chunks[-2].choices] == ["length"]
    msgs = [{"role": "user", "content": LONG}]
    whole = c.chat.completions.create(messages=msgs, **args).choices[0].message.content
    text, chunks = stream_text(c.chat.completions.create(messages=msgs, stream=True, **args))
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None
