"""OpenAI response bodies and stream chunks, built from the engine's token events.

The decode / colocated replica streams lists of `Tok` (one per generated token of any choice). `ChoiceState`
accumulates one choice; the same code builds a streamed chunk's delta and the non-streamed choice, so a stream's
concatenated deltas equal the non-streamed text (and reasoning) exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from ernie_platform.serving.chat import ReasoningSplitter

DONE = "data: [DONE]\n\n"


class Tok(NamedTuple):
    """One generated token as the engine replica sends it (plain data: cheap to pickle across replicas)."""

    index: int  # choice of the engine request
    token_id: int
    text: str  # newly complete text ("" while pending)
    logprob: Optional[float] = None
    top_logprobs: Optional[dict[str, float]] = None
    finish_reason: Optional[str] = None
    token: Optional[str] = None  # the token's own text (for logprobs), see Engine.token_text


class KVRef(NamedTuple):
    """A prefill result in the object store, handed to the decode replica by reference (the token streams travel
    over Serve's direct gRPC transport, which would otherwise fetch the result into the ingress and resend it)."""

    ref: Any  # ray.ObjectRef of a PrefillResult, owned by the ingress, which keeps it alive until the stream ends
    prompt_tokens: int = 0  # its prompt length, for load-aware routing before the result is fetched (0: unknown)


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Delta:
    text: str = ""
    reasoning: str = ""
    toks: list[Tok] = field(default_factory=list)
    finish_reason: Optional[str] = None


@dataclass
class ChoiceState:
    index: int  # index in the response (prompt_index * n + choice)
    prompt_tokens: int
    splitter: Optional[ReasoningSplitter] = None  # chat with thinking on
    text: str = ""
    reasoning: str = ""
    toks: list[Tok] = field(default_factory=list)
    finish_reason: Optional[str] = None
    text_offset: int = 0

    def add(self, toks: list[Tok]) -> Delta:
        """Fold this choice's new tokens in; returns what they add (the delta of one stream chunk)."""
        d = Delta(toks=list(toks))
        for t in toks:
            if self.splitter is not None:
                r, c = self.splitter.feed(t.token_id, t.text)
                if t.finish_reason is not None:
                    r2, c2 = self.splitter.finish()
                    r, c = r + r2, c + c2
                d.reasoning += r
                d.text += c
            else:
                d.text += t.text
            if t.finish_reason is not None:
                d.finish_reason = self.finish_reason = t.finish_reason
        self.text += d.text
        self.reasoning += d.reasoning
        self.toks.extend(toks)
        return d


# ---- completions ------------------------------------------------------------------------------------------------
def completion_logprobs(toks: list[Tok], start_offset: int) -> dict[str, Any]:
    offsets, pos = [], start_offset
    for t in toks:
        offsets.append(pos)
        pos += len(t.token or "")
    return {
        "tokens": [t.token for t in toks],
        "token_logprobs": [t.logprob for t in toks],
        "top_logprobs": [dict(t.top_logprobs or {}) for t in toks],
        "text_offset": offsets,
    }


def completion_choice(c: ChoiceState, want_logprobs: bool, token_ids: bool, echo: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": c.index,
        "text": echo + c.text,
        "logprobs": completion_logprobs(c.toks, len(echo)) if want_logprobs else None,
        "finish_reason": c.finish_reason,
    }
    if token_ids:
        out["token_ids"] = [t.token_id for t in c.toks]
    return out


def completion_chunk(
    rid: str, created: int, model: str, c: ChoiceState, d: Delta, want_logprobs: bool, token_ids: bool,
    include_usage: bool,
) -> dict[str, Any]:  # fmt: skip
    choice: dict[str, Any] = {
        "index": c.index,
        "text": d.text,
        "logprobs": completion_logprobs(d.toks, c.text_offset) if want_logprobs else None,
        "finish_reason": d.finish_reason,
    }
    if want_logprobs:
        c.text_offset += sum(len(t.token or "") for t in d.toks)
    if token_ids:
        choice["token_ids"] = [t.token_id for t in d.toks]
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def completion_response(
    rid: str, model: str, choices: list[ChoiceState], prompt_tokens: int, want_logprobs: bool, token_ids: bool,
    echoes: Optional[list[str]] = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            completion_choice(c, want_logprobs, token_ids, echoes[i] if echoes else "") for i, c in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, sum(len(c.toks) for c in choices)),
    }


# ---- chat -------------------------------------------------------------------------------------------------------
def _lp_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(toks: list[Tok]) -> dict[str, Any]:
    content = []
    for t in toks:
        top = [_lp_entry(k, v) for k, v in (t.top_logprobs or {}).items()]
        content.append({**_lp_entry(t.token or "", t.logprob), "top_logprobs": top})
    return {"content": content}


def chat_message(c: ChoiceState) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": c.text}
    if c.splitter is not None:
        msg["reasoning_content"] = c.reasoning
    return msg


def chat_response(
    rid: str, model: str, choices: list[ChoiceState], prompt_tokens: int, want_logprobs: bool, token_ids: bool
) -> dict[str, Any]:
    out = []
    for c in choices:
        ch: dict[str, Any] = {
            "index": c.index,
            "message": chat_message(c),
            "logprobs": chat_logprobs(c.toks) if want_logprobs else None,
            "finish_reason": c.finish_reason,
        }
        if token_ids:
            ch["token_ids"] = [t.token_id for t in c.toks]
        out.append(ch)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage(prompt_tokens, sum(len(c.toks) for c in choices)),
    }


def chat_chunk(
    rid: str, created: int, model: str, index: int, delta: dict[str, Any], finish_reason: Optional[str],
    logprobs: Optional[dict[str, Any]], include_usage: bool, token_ids: Optional[list[int]] = None,
) -> dict[str, Any]:  # fmt: skip
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def chat_delta_chunk(
    rid: str, created: int, model: str, c: ChoiceState, d: Delta, want_logprobs: bool, token_ids: bool,
    include_usage: bool,
) -> Optional[dict[str, Any]]:  # fmt: skip
    """The chunk for one choice's new tokens, or None when they add nothing visible (pending text, no logprobs)."""
    delta: dict[str, Any] = {}
    if d.reasoning:
        delta["reasoning_content"] = d.reasoning
    if d.text:
        delta["content"] = d.text
    if not delta and d.finish_reason is None and not want_logprobs and not token_ids:
        return None
    return chat_chunk(
        rid, created, model, c.index, delta, d.finish_reason, chat_logprobs(d.toks) if want_logprobs else None,
        include_usage, [t.token_id for t in d.toks] if token_ids else None,
    )  # fmt: skip


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def group_by_choice(toks: list[Tok]) -> dict[int, list[Tok]]:
    out: dict[int, list[Tok]] = {}
    for t in toks:
        out.setdefault(t.index, []).append(t)
    return out
