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
