"""Fuzzing the OpenAI API of the real app over HTTP (issue #22): Ray Serve started for real on 127.0.0.1, a tiny
checkpoint, colocated mode. Two sources of requests:

* a hand-written list of hostile inputs (malformed / truncated JSON, invalid UTF-8, a 10 MB body, chunked bodies,
  deeply nested JSON, huge and negative numbers, wrong types in every field, unknown roles, empty messages, ...);
* hypothesis: bodies generated from the app's own OpenAPI schema (`/openapi.json`, the request models; a small
  JSON-schema-to-strategy converter below: hypothesis-jsonschema 0.23 does not run on current hypothesis), the same
  with the served model name (so they get past the model check), every schema field set to random JSON of any
  type, structured chat messages with random roles and content parts, and random bytes.

Every answer must be below 500, every 4xx must be OpenAI's error object `{"error": {"message", "type", "param",
"code"}}`, a 200 stream must end with `data: [DONE]` without an `internal_error` event, and the server must answer
a normal request afterwards. The number of cases is printed (`-s`) and recorded in docs/serving.md.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "ckpt"
PREFIX = "/fuzz"
TIMEOUT = 120.0
# examples per hypothesis test function below (5 of them); ERNIE_FUZZ_EXAMPLES=1000 for a longer run
EXAMPLES = int(os.environ.get("ERNIE_FUZZ_EXAMPLES", "300"))
COUNT = {"cases": 0, "by_status": {}}
FIELDS = {  # every documented request field, with a valid value
    "completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "n": 1,
                    "stream": False, "stream_options": None, "stop": ["x"], "seed": 1, "presence_penalty": 0,
                    "frequency_penalty": 0, "logit_bias": {}, "user": "u", "top_k": 5, "ignore_eos": True,
                    "return_token_ids": False, "logprobs": 1, "echo": False, "best_of": 1, "suffix": None},
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0.5,
             "top_p": 0.9, "n": 1, "stream": False, "stop": "x", "seed": 1, "top_k": 5, "ignore_eos": True,
             "max_completion_tokens": 2, "logprobs": True, "top_logprobs": 2, "chat_template_kwargs": {},
             "metadata": {}, "tools": None, "tool_choice": None, "response_format": {"type": "text"}},
}  # fmt: skip
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tiny_moe_ckpt: Path) -> Any:
    """(host, port) of the colocated app on the tiny checkpoint, as tests/test_serve_app.py starts it; a short context
    (64) keeps the generated requests that pass validation cheap."""
    from ray import serve

    from workloads.serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"model.path": str(tiny_moe_ckpt), "serve.mode": "colocated", "serve.engine.max_seq_len": 64,
                     "serve.engine.max_batch_size": 16, "serve.default_max_tokens": 4})  # fmt: skip
    serve.run(app, name="fuzz", route_prefix=PREFIX)
    yield "127.0.0.1", port
    serve.shutdown()
    counts = dict(sorted(COUNT["by_status"].items()))
    print(f"\n[fuzz] {COUNT['cases']} cases against the real app; status counts {counts}")


def _send(server: tuple[str, int], path: str, body: bytes, headers: Optional[dict] = None, chunked: bool = False,
          method: str = "POST") -> tuple[int, str, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection(*server, timeout=TIMEOUT)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            conn.putrequest(method, PREFIX + path)
            for k, v in {**hdrs, "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, PREFIX + path, body=body, headers=hdrs)
        r = conn.getresponse()
        return r.status, r.headers.get("content-type", ""), r.read()
    finally:
        conn.close()


def _check(status: int, ctype: str, raw: bytes, what: Any) -> None:
    """No 5xx; 4xx in OpenAI's error shape; 200: a JSON body or a complete SSE stream without an internal error."""
    COUNT["cases"] += 1
    COUNT["by_status"][status] = COUNT["by_status"].get(status, 0) + 1
    where = repr(what)[:300]
    assert status < 500, (status, raw[:500], where)
    if status >= 400:
        body = json.loads(raw)
        err = body["error"]
        assert set(body) == {"error"} and set(err) == {"message", "type", "param", "code"}, (body, where)
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), (body, where)
        return
    assert status == 200, (status, where)
    if ctype.startswith("text/event-stream"):
        events = raw.decode().split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]", (raw[-300:], where)
        for e in events[:-2]:
            obj = json.loads(e.removeprefix("data: "))
            assert "error" not in obj or obj["error"]["code"] not in (None, "internal_error"), (obj, where)
    else:
        assert "choices" in json.loads(raw) or "data" in json.loads(raw), (raw[:300], where)


def _post(server: tuple[str, int], endpoint: str, body: Any, **kw: Any) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    _check(*_send(server, PATHS[endpoint], raw, **kw), (endpoint, body if len(raw) < 2000 else f"{len(raw)} bytes"))


def _normal_request_works(server: tuple[str, int]) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    status, _, raw = _send(server, "/v1/completions", json.dumps(body).encode())
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 4, raw


def _wrong_types() -> list[Any]:
    return [None, True, -1, 0, 2**63, -(2**70), 1e308, -0.5, "", "x", "2", [], [None], {}, {"a": 1}, [[[]]]]


def _hostile() -> list[tuple[str, Any, dict]]:
    """(endpoint, body, send options) of the hand-written hostile inputs."""
    c = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    m = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    good = json.dumps(c).encode()
    cases: list[tuple[str, Any, dict]] = []
    for ep in ("completions", "chat"):
        base = json.dumps(c if ep == "completions" else m).encode()
        cases += [(ep, raw, {}) for raw in (
            b"", b" ", b"{", b"}", b"null", b"true", b"1", b'"x"', b"[]", b"[{}]", base[: len(base) // 2],
            base[:-1], base + b"}", base + b"garbage", b"\xff\xfe\xfd", base.replace(b"Hi", b"H\xffi"),
            base.replace(b"Hi", b"\\ud800"), base.replace(b"Hi", b"\\u0000"), b"{" * 200_000, b"[" * 1_000_000,
            b'{"model": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", b"\x00" * 1000, "{\"model\": \"\u00e9\"}".encode(),
            b'{"model": "ckpt", "model": 5}', b'{"temperature": NaN, "model": "ckpt"}',
        )]  # fmt: skip
        cases.append((ep, b"{" + b" " * (10 * 2**20) + b"}", {}))  # 10 MB: over serve.max_request_bytes
        cases.append((ep, b"{" + b" " * (5 * 2**20) + b"}", {"chunked": True}))  # chunked, over the limit
        cases.append((ep, base, {"chunked": True}))  # chunked, fine
        cases.append((ep, base, {"headers": {"Content-Type": "text/plain"}}))
        for name in FIELDS[ep]:  # wrong types (and hostile values) in every field
            for v in _wrong_types():
                body = dict(c if ep == "completions" else m)
                body[name] = v
                cases.append((ep, body, {}))
    cases += [("completions", {**c, **kv}, {}) for kv in (
        {"n": 10**9}, {"n": -1}, {"max_tokens": 10**12}, {"max_tokens": -5}, {"max_tokens": 63}, {"top_k": 10**9},
        {"top_k": -2}, {"seed": -1}, {"seed": 2**64}, {"logprobs": 10**6}, {"logprobs": -1}, {"temperature": 1e-320},
        {"prompt": [[]]}, {"prompt": [[1, 2], []]}, {"prompt": [-1]}, {"prompt": [2**40]}, {"prompt": ["a"] * 65},
        {"prompt": [[5]] * 64, "n": 8, "max_tokens": 4}, {"prompt": "\u0000\u200b\ufeff"}, {"prompt": "x" * 60_000},
        {"stop": [""]}, {"stop": ["a"] * 5}, {"stop": "x" * 100_000}, {"echo": True, "logprobs": 0},
        {"stream": True, "stream_options": {"include_usage": "yes"}}, {"stream": True, "n": 3, "echo": True},
        {"stream_options": {"include_usage": True}}, {"best_of": 2}, {"suffix": "s"}, {"logit_bias": {"1": 5}},
        {"presence_penalty": 3}, {"prompt": {"text": "x"}}, {"max_tokens": 1.5}, {"max_tokens": True},
    )]  # fmt: skip
    cases += [("chat", {**m, **kv}, {}) for kv in (
        {"messages": []}, {"messages": [{}]}, {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "tool", "content": "x"}]}, {"messages": [{"role": "user", "content": None}]},
        {"messages": [{"role": "user", "content": ""}]}, {"messages": [{"role": "assistant"}]},
        {"messages": [{"role": "user", "content": []}]}, {"messages": [{"role": "user", "content": [{}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:,x"}]}]},
        {"messages": [{"role": "user", "content": {"text": "x"}}]}, {"messages": [["user", "x"]]},
        {"messages": [{"role": None, "content": "x"}]}, {"messages": [{"role": ["user"], "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}] * 5000},
        {"messages": [{"role": "user", "content": "x" * 60_000}]},
        {"n": 10**9}, {"max_completion_tokens": -1}, {"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2},
        {"chat_template_kwargs": {"enable_thinking": "maybe"}}, {"chat_template_kwargs": {"enable_thinking": True}},
        {"metadata": {"enable_thinking": 7}}, {"tools": [{"type": "function"}]}, {"tool_choice": "auto"},
        {"response_format": {"type": "json_object"}}, {"response_format": {"type": 5}}, {"stream": True, "n": 2},
        {"messages": [{"role": "user", "content": "<|IMAGE_PLACEHOLDER|>"}]},
    )]  # fmt: skip
    cases.append(("completions", good, {"method": "PUT"}))
    return cases


def test_hostile_inputs_then_a_normal_request(server: tuple[str, int]) -> None:
    t0, before = time.time(), COUNT["cases"]
    for ep, body, opts in _hostile():
        if opts.get("method"):
            _check(*_send(server, PATHS[ep], body, method=opts["method"]), (ep, opts))
            continue
        _post(server, ep, body, **opts)
    for path in ("/v1/models", "/health", "/metrics", "/v1/nope", "/openapi.json"):
        status, ctype, raw = _send(server, path, b"", method="GET")
        assert status < 500, (path, status, raw[:300])
    _normal_request_works(server)
    print(f"\n[fuzz] hand-written hostile inputs: {COUNT['cases'] - before} cases in {time.time() - t0:.1f} s")


# ---- hypothesis ------------------------------------------------------------------------------------------------------
_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
                     suppress_health_check=list(HealthCheck))  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy:
    """Values matching a JSON schema of the kind pydantic writes (`$ref`, `anyOf`, `type`, `properties`,
    `required`, `items`, `additionalProperties`, `enum`/`const`); `root` resolves `#/...` references."""
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return st.deferred(lambda: from_schema(node, root))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema.get("anyOf") or schema["oneOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, root) for k in kind])
    if kind == "string":
        return st.text(max_size=40)
    if kind == "integer":
        return st.integers()
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False) | st.integers()
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), root), max_size=4)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        extra = schema.get("additionalProperties", True)
        values = from_schema(extra, root) if isinstance(extra, dict) else JSON
        base = st.fixed_dictionaries(
            {k: from_schema(v, root) for k, v in props.items() if k in required},
            optional={k: from_schema(v, root) for k, v in props.items() if k not in required},
        )
        if extra is False:
            return base
        extras = st.dictionaries(st.text(max_size=8), values, max_size=2)
        return st.tuples(base, extras).map(lambda t: {**t[0], **{k: v for k, v in t[1].items() if k not in t[0]}})
    return JSON  # {} or an unknown form: any JSON


def _schemas(server: tuple[str, int]) -> dict[str, st.SearchStrategy]:
    status, _, raw = _send(server, "/openapi.json", b"", method="GET")
    assert status == 200
    spec = json.loads(raw)
    out = {}
    for ep, path in PATHS.items():
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].startswith("#/components/schemas/"), schema
        out[ep] = from_schema(schema, spec)
    return out


@pytest.fixture(scope="module")
def schemas(server: tuple[str, int]) -> dict[str, st.SearchStrategy]:
    return _schemas(server)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_fuzz_bodies_from_the_openapi_schema(server: tuple[str, int], schemas: dict, endpoint: str) -> None:
    """Schema-valid bodies (random model names mostly 404), and the same with the served model's name."""
    bodies = schemas[endpoint]
    named = bodies.map(lambda b: {**b, "model": MODEL} if isinstance(b, dict) else b)
    t0, before = time.time(), COUNT["cases"]

    @_SETTINGS
    @given(body=st.one_of(bodies, named, named))
    def run(body: Any) -> None:
        _post(server, endpoint, body)

    run()
    _normal_request_works(server)
    print(f"\n[fuzz] {endpoint} from the schema: {COUNT['cases'] - before} cases in {time.time() - t0:.1f} s")


def test_fuzz_every_field_with_random_json(server: tuple[str, int]) -> None:
    t0, before = time.time(), COUNT["cases"]

    @_SETTINGS
    @given(ep=st.sampled_from(sorted(FIELDS)), data=st.data())
    def run(ep: str, data: Any) -> None:
        body = dict(FIELDS[ep])
        for name in data.draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=3, unique=True)):
            body[name] = data.draw(JSON)
        body = {k: v for k, v in body.items() if v is not None or data.draw(st.booleans())}
        if body.get("stream") is not True:
            body.pop("stream_options", None)
        _post(server, ep, body)

    run()
    _normal_request_works(server)
    print(f"\n[fuzz] random JSON in every field: {COUNT['cases'] - before} cases in {time.time() - t0:.1f} s")


ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "", "USER", "wizard"])
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)}),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["image_url", "input_image", "audio", "text"]),
            "image_url": st.one_of(st.text(max_size=30), st.fixed_dictionaries({"url": st.text(max_size=30)}), JSON),
        }
    ),
    JSON,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": ROLES, "content": st.one_of(st.text(max_size=60), st.lists(PART, max_size=3), st.none(), JSON)}
    ),
    JSON,
)


def test_fuzz_chat_messages_and_raw_bytes(server: tuple[str, int]) -> None:
    t0, before = time.time(), COUNT["cases"]

    @_SETTINGS
    @given(messages=st.lists(MESSAGE, max_size=4), stream=st.booleans(), n=st.integers(-2, 10),
           thinking=st.one_of(st.none(), st.booleans(), st.text(max_size=5)))  # fmt: skip
    def chats(messages: list, stream: bool, n: int, thinking: Any) -> None:
        body: dict[str, Any] = {"model": MODEL, "messages": messages, "stream": stream, "n": n, "max_tokens": 3}
        if thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": thinking}
        _post(server, "chat", body)

    @_SETTINGS
    @given(ep=st.sampled_from(sorted(PATHS)), raw=st.binary(max_size=300))
    def raw_bytes(ep: str, raw: bytes) -> None:
        _post(server, ep, raw)

    chats()
    raw_bytes()
    _normal_request_works(server)
    print(f"\n[fuzz] chat messages and raw bytes: {COUNT['cases'] - before} cases in {time.time() - t0:.1f} s")
