"""OpenAI request models and their validation into engine `SamplingParams`.

Bodies are parsed with pydantic in strict JSON mode, so `"n": "2"` or `"temperature": "hot"` is a 400 rather than
silently coerced. Every rejection is an `APIError`, rendered by the ingress as OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`. Unknown fields are accepted and ignored (clients send extras), except
the few OpenAI features the engine does not implement, which are rejected by name instead of being ignored. vLLM's
sampling extensions (min_tokens, repetition_penalty, min_p, stop_token_ids, allowed_token_ids) and OpenAI's
presence/frequency penalties and logit_bias go to the engine with `serve.engine.backend=vllm`
(`SamplingParams.extra`) and are refused by name with the native engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ernie_platform.inference.sampling import SamplingParams

MAX_LOGPROBS = 20  # OpenAI's bound for chat top_logprobs; completions' logprobs accepts the same here
MAX_STOP = 4
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing the logits by a subnormal temperature
# such as 1e-320 gives inf/nan probabilities, and the engine step that fails takes every request of its batch along.
MIN_TEMPERATURE = 1e-5


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names; extras marked)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extensions (vLLM names): sent by the openai client through extra_body
    top_k: Optional[int] = None  # 0 or -1: off
    ignore_eos: Optional[bool] = False
    return_token_ids: Optional[bool] = False  # choices carry `token_ids` (prompt ids in `prompt_token_ids`)
    # vLLM's sampling extensions: honoured with serve.engine.backend=vllm, refused by name with the native engine
    min_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    min_p: Optional[float] = None
    stop_token_ids: Optional[list[int]] = None
    allowed_token_ids: Optional[list[int]] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "int", "float", "bool"):
            continue  # union-branch names pydantic puts in the location
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Validate a raw JSON body; malformed JSON, missing fields and wrong types are 400s naming the field."""
    try:
        return model.model_validate_json(raw or b"", strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        if first["type"] in ("json_invalid", "json_type") or not raw:
            raise bad_request(f"request body is not valid JSON: {first['msg']}", code="invalid_json") from None
        if first["type"] == "model_type":
            raise bad_request("request body must be a JSON object", code="invalid_json") from None
        param = _param(tuple(first["loc"]))
        if first["type"] == "missing":
            raise bad_request(f"missing required field '{param}'", param, "missing_required_parameter") from None
        # a union reports one error per branch: name the field once, with what was given
        given = first.get("input")
        raise bad_request(
            f"invalid value for '{param}': {first['msg']} (got {given!r:.80})", param, "invalid_type"
        ) from None


@dataclass
class Sampling:
    """What a validated request asks of the engine, besides its prompt."""

    params: SamplingParams  # max_tokens may still be None (chat default, decided once the prompt length is known)
    stream: bool
    include_usage: bool
    return_token_ids: bool


def _check_range(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value > hi or (value <= lo if lo_open else value < lo):
        bracket = "(" if lo_open else "["
        raise bad_request(f"{name}={value} is out of range {bracket}{lo}, {hi}]", name, "invalid_value")


def sampling_from_request(
    req: _Common,
    max_n: int,
    logprobs: Optional[int],
    max_tokens: Optional[int],
    max_tokens_name: str = "max_tokens",
    backend: str = "native",
    vocab_size: Optional[int] = None,
) -> Sampling:
    """Range checks (OpenAI's bounds, plus the engine's) and the `SamplingParams` of a request."""
    _check_range("temperature", req.temperature, 0.0, 2.0)
    _check_range("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    n = 1 if req.n is None else req.n
    if not 1 <= n <= max_n:
        raise bad_request(f"n={n} is out of range [1, {max_n}]", "n", "invalid_value")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{max_tokens_name}={max_tokens} must be >= 1", max_tokens_name, "invalid_value")
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"top_k={req.top_k} must be -1 or 0 (off) or a positive integer", "top_k", "invalid_value")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise bad_request(f"seed={req.seed} must be in [0, 2**63)", "seed", "invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise bad_request(f"stop must be at most {MAX_STOP} non-empty strings", "stop", "invalid_value")
    extra = vllm_fields(req, max_tokens, vocab_size)
    if extra and backend != "vllm":
        name = next(iter(extra))
        raise bad_request(f"{name} is not supported by this server's engine (serve.engine.backend={backend}; the vllm "
                          "backend supports it)", name, "unsupported_parameter")  # fmt: skip
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options", "invalid_value")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 0,
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=max(0, req.top_k or 0),
        seed=req.seed,
        stop=stop,
        logprobs=logprobs,
        ignore_eos=bool(req.ignore_eos),
        n=n,
        extra=extra,
    )
    return Sampling(params, bool(req.stream), include_usage, bool(req.return_token_ids))


def vllm_fields(req: _Common, max_tokens: Optional[int], vocab_size: Optional[int]) -> dict[str, Any]:
    """The request's sampling fields that only the vLLM backend implements, range-checked (vLLM's and OpenAI's
    bounds) and keyed by vLLM's `SamplingParams` names; fields at their no-op value are left out."""
    out: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        _check_range(name, v, -2.0, 2.0)
        if v:
            out[name] = float(v)
    if req.logit_bias:
        bias = {}
        for k, v in req.logit_bias.items():
            if not k.lstrip("-").isdigit() or not _in_vocab(int(k), vocab_size):
                raise bad_request(f"logit_bias key {k!r} is not a token id of this model", "logit_bias",
                                  "invalid_value")  # fmt: skip
            _check_range("logit_bias", v, -100.0, 100.0)
            bias[int(k)] = float(v)
        out["logit_bias"] = bias
    if req.repetition_penalty is not None:
        _check_range("repetition_penalty", req.repetition_penalty, 0.0, 2.0, lo_open=True)
        if req.repetition_penalty != 1.0:
            out["repetition_penalty"] = float(req.repetition_penalty)
    if req.min_p is not None:
        _check_range("min_p", req.min_p, 0.0, 1.0)
        if req.min_p:
            out["min_p"] = float(req.min_p)
    if req.min_tokens is not None:
        if req.min_tokens < 0 or (max_tokens is not None and req.min_tokens > max_tokens):
            raise bad_request(f"min_tokens={req.min_tokens} must be in [0, max_tokens]", "min_tokens", "invalid_value")
        if req.min_tokens:
            out["min_tokens"] = int(req.min_tokens)
    for name in ("stop_token_ids", "allowed_token_ids"):
        ids = getattr(req, name)
        if ids is None:
            continue
        bad = [t for t in ids if not _in_vocab(t, vocab_size)]
        if bad or (name == "allowed_token_ids" and not ids):
            what = f"token ids {bad[:5]} are not in this model's vocabulary" if bad else "must not be empty"
            raise bad_request(f"{name}: {what}", name, "invalid_value")
        if ids:
            out[name] = list(ids)
    return out


def _in_vocab(token_id: int, vocab_size: Optional[int]) -> bool:
    return token_id >= 0 and (vocab_size is None or token_id < vocab_size)


def completion_sampling(
    req: CompletionRequest, max_n: int, backend: str = "native", vocab_size: Optional[int] = None
) -> Sampling:
    if req.suffix is not None:
        raise bad_request("suffix is not supported by this server", "suffix", "unsupported_parameter")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of must equal n (no server-side ranking)", "best_of", "unsupported_parameter")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs={req.logprobs} is out of range [0, {MAX_LOGPROBS}]", "logprobs", "invalid_value")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs (prompt logprobs) is not supported", "echo", "unsupported_parameter")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    return sampling_from_request(req, max_n, req.logprobs, max_tokens, "max_tokens", backend, vocab_size)


def chat_sampling(req: ChatRequest, max_n: int, backend: str = "native", vocab_size: Optional[int] = None) -> Sampling:
    if req.tools or req.tool_choice not in (None, "none"):
        raise bad_request("tools / tool_choice are not supported by this server", "tools", "unsupported_parameter")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format type {fmt!r} is not supported", "response_format", "unsupported_parameter")
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"top_logprobs={req.top_logprobs} is out of range [0, {MAX_LOGPROBS}]", "top_logprobs", "invalid_value"
            )
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs", "invalid_value")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return sampling_from_request(req, max_n, logprobs, max_tokens, name, backend, vocab_size)


def thinking_requested(req: ChatRequest) -> Optional[bool]:
    """`chat_template_kwargs.enable_thinking` (bool) or `metadata.enable_thinking` (OpenAI metadata values are
    strings: "true"/"false"); None when the request does not say."""
    for where, src in (("chat_template_kwargs", req.chat_template_kwargs), ("metadata", req.metadata)):
        if src and "enable_thinking" in src:
            v = src["enable_thinking"]
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
                return v.lower() in ("true", "1")
            raise bad_request(
                f"{where}.enable_thinking must be a boolean (got {v!r})", f"{where}.enable_thinking", "invalid_value"
            )
    return None
