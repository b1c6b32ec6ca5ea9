"""Serving hardening (issue #22): the API key never reaches a config or the disk, request-body limit (413), prompts
tokenized off the event loop with bounded concurrency, `/v1/models` without the server's paths, `/metrics` behind
the key on request.

The ingress tests run its real route methods in-process on fake engine handles (no Ray); the last test runs
`python -m workloads.serve` for real (its own Ray instance) with the key from the environment and from a file, and
searches every file the run wrote for the key.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest

from ernie_platform.serving import responses as R
from ernie_platform.serving.auth import (
    API_KEY_ENV,
    LEGACY_API_KEY_ENV,
    ApiKeyConfigError,
    Secret,
    key_overrides,
    reject_key_mapping,
    reject_key_overrides,
    resolve_api_key,
)
from tests.conftest import read_until

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-hardening-4f1c9e2b7d"


# ---- the API key: never a config value ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    ["serve.api_key=" + SECRET, "+serve.api_key=" + SECRET, "++serve.api_key=" + SECRET, "api_key=" + SECRET,
     "serve={api_key: " + SECRET + "}"],
)  # fmt: skip
def test_key_overrides_are_refused_without_echoing_the_value(override: str) -> None:
    with pytest.raises(ApiKeyConfigError) as e:
        reject_key_overrides(["serve.mode=colocated", override])
    msg = str(e.value)
    assert SECRET not in msg and API_KEY_ENV in msg and "serve.api_key_file" in msg


def test_other_overrides_pass() -> None:
    assert key_overrides(["serve.api_key_file=/k", "~serve.api_key", "run.name=my_api_key", "--cfg", "-m"]) == []


def test_build_app_args_refuse_a_key() -> None:
    for args in ({"serve.api_key": SECRET}, {"serve": {"api_key": SECRET}}):
        with pytest.raises(ApiKeyConfigError) as e:
            reject_key_mapping(args)
        assert SECRET not in str(e.value)
    reject_key_mapping({"serve": {"api_key_file": "/k", "mode": "pd"}})
    from workloads.serve.app import compose_config

    with pytest.raises(ApiKeyConfigError):
        compose_config({"serve.api_key": SECRET})


def test_resolve_api_key_from_env_file_and_legacy_env(tmp_path: Path) -> None:
    assert resolve_api_key({}, environ={}) is None
    assert resolve_api_key({}, environ={API_KEY_ENV: f" {SECRET}\n"}).get() == SECRET
    assert resolve_api_key({}, environ={LEGACY_API_KEY_ENV: SECRET}).get() == SECRET  # old deployments keep auth
    f = tmp_path / "key"
    f.write_text(SECRET + "\n")
    key = resolve_api_key({"api_key_file": str(f)}, environ={API_KEY_ENV: "other"})  # the file wins
    assert key.get() == SECRET and SECRET not in repr(key) and SECRET not in str({"k": key})
    assert pickle.loads(pickle.dumps(key)) == key  # travels to the ingress replica as an init argument
    with pytest.raises(ApiKeyConfigError):
        resolve_api_key({"api_key": SECRET}, environ={})
    f.write_text(f"{SECRET} {SECRET}")
    with pytest.raises(ValueError) as e:
        resolve_api_key({"api_key_file": str(f)}, environ={})
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError, match="cannot be read"):
        resolve_api_key({"api_key_file": str(tmp_path / "missing")}, environ={})


def test_composed_serve_config_has_no_key_field(tmp_path: Path) -> None:
    from workloads.serve.app import compose_config

    cfg = compose_config({"run.storage_path": str(tmp_path)})
    assert "api_key" not in cfg.serve and cfg.serve.api_key_file is None
    assert cfg.serve.max_request_bytes == 4 * 2**20 and cfg.serve.metrics_require_key is False


@pytest.mark.slow
@pytest.mark.parametrize("override", ["serve.api_key=" + SECRET, "+serve.api_key=" + SECRET])
def test_cli_refuses_a_key_override_before_hydra_writes_anything(tmp_path: Path, override: str) -> None:
    out = tmp_path / "hydra"
    # serve.mode=bogus: were the override accepted, the job would stop at validation (after Hydra wrote its files)
    # instead of starting a server
    cmd = [sys.executable, "-m", "workloads.serve", override, "serve.mode=bogus", f"hydra.run.dir={out}",
           f"run.storage_path={tmp_path}"]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "local"}
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ERNIE_API_KEY" in r.stderr and "serve.api_key_file" in r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert not out.exists()  # Hydra never ran: nothing written


# ---- the ingress, in-process on fake engine handles -----------------------------------------------------------------
class _Stream:
    """What `handle.options(stream=True).generate.remote(...)` returns: token lists, then the end."""

    def __init__(self, params: Any):
        self.params = params

    def __aiter__(self) -> Any:
        return self._run()

    async def _run(self) -> Any:
        for k in range(self.params.max_tokens):
            last = k == self.params.max_tokens - 1
            yield [R.Tok(i, 7, "a", finish_reason="length" if last else None) for i in range(self.params.n)]

    def cancel(self) -> None:
        pass


class _Method:
    def __init__(self, fn: Any):
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class _Handle:
    """A fake engine deployment handle (colocated mode)."""

    def __init__(self) -> None:
        self.generate = _Method(lambda rid, ids, params, want, mm=None: _Stream(params))
        self.stats = _Method(self._stats)

    def options(self, **_: Any) -> _Handle:
        return self

    @staticmethod
    def _stats() -> Any:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result({"deployment": "Engine", "replica": "r1", "waiting": 0.0})
        return fut


def _ingress(**cfg: Any) -> Any:
    from ernie_platform.serving.ingress import Ingress

    cls = Ingress.__mro__[1]  # the class under Serve's ASGI wrapper: plain Python, no replica needed
    assert "_serve" in vars(cls)
    base = dict(model_name="m", model_path=None, mode="colocated", max_seq_len=256, kv_budget_tokens=4096,
                vocab_size=272, is_vl=False, vision=None, max_n=8, default_max_tokens=16, disagg_min_prompt_tokens=8,
                retries=1, grpc_transport=True, replicas={"prefill": 1, "engine": 1}, api_key=None,
                max_request_bytes=1 << 20, max_concurrent_tokenizations=2, metrics_require_key=False)  # fmt: skip
    return cls({**base, **cfg}, None, _Handle())


def _request(body: Optional[bytes] = None, chunks: Optional[list[bytes]] = None, headers: Optional[dict] = None,
             path: str = "/v1/completions", method: str = "POST", forever: Optional[bytes] = None) -> Any:  # fmt: skip
    """A Starlette request whose body arrives as `body` (with Content-Length), `chunks` (chunked), or `forever`
    (chunked, never ending). `.reads` counts the body messages the app pulled."""
    from starlette.requests import Request

    hdrs = {"content-type": "application/json", **(headers or {})}
    if body is not None:
        hdrs.setdefault("content-length", str(len(body)))
        chunks = [body]
    messages = list(chunks or [])
    state = {"reads": 0}

    async def receive() -> dict:
        state["reads"] += 1
        if forever is not None:  # "never" ending: 20,000 chunks, so that a server without a limit does not hang
            return {"type": "http.request", "body": forever, "more_body": state["reads"] < 20_000}
        if messages:
            chunk = messages.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(messages)}
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555)}  # fmt: skip
    req = Request(scope, receive)
    req.state_reads = state
    return req


def _json(resp: Any) -> tuple[int, Any]:
    return resp.status_code, json.loads(resp.body)


def _completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 3, **fields}).encode()


def _assert_openai_error(status: int, body: Any, want: int, code: Optional[str] = None) -> None:
    assert status == want, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body


def test_body_over_the_limit_is_413_from_content_length_without_reading_it() -> None:
    ing = _ingress(max_request_bytes=4096)
    req = _request(body=_completion(prompt="x" * 5000))
    status, body = _json(asyncio.run(ing.completions(req)))
    _assert_openai_error(status, body, 413, "request_too_large")
    assert req.state_reads["reads"] == 0  # decided from the header alone
    assert "4096" in body["error"]["message"]
    chat = _request(body=json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}).encode(),
                    path="/v1/chat/completions")  # fmt: skip
    _assert_openai_error(*_json(asyncio.run(ing.chat_completions(chat))), 413, "request_too_large")


def test_chunked_body_over_the_limit_is_413_while_reading() -> None:
    ing = _ingress(max_request_bytes=4096)
    req = _request(forever=b" " * 1000)  # no Content-Length, never ends: must stop reading at the limit
    _assert_openai_error(*_json(asyncio.run(ing.completions(req))), 413, "request_too_large")
    assert req.state_reads["reads"] <= 6
    # a client declaring a small length but sending more is cut at the limit too
    req = _request(chunks=[b"{" + b" " * 3000, b" " * 3000], headers={"content-length": "10"})
    _assert_openai_error(*_json(asyncio.run(ing.completions(req))), 413, "request_too_large")
    # under the limit, chunked: served
    body = _completion()
    status, out = _json(asyncio.run(ing.completions(_request(chunks=[body[:10], body[10:]]))))
    assert status == 200 and out["usage"]["completion_tokens"] == 3, out


def test_bad_content_length_is_400() -> None:
    ing = _ingress()
    req = _request(chunks=[_completion()], headers={"content-length": "12abc"})
    _assert_openai_error(*_json(asyncio.run(ing.completions(req))), 400)


class _SlowTokenizer:
    """The built-in tokenizer, but each encode takes `delay` seconds of CPU-bound-like blocking."""

    def __init__(self, inner: Any, delay: float):
        self.inner, self.delay = inner, delay
        self.threads: list[str] = []
        self.active = self.peak = 0
        self.lock = threading.Lock()

    def encode(self, *a: Any, **kw: Any) -> Any:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)  # blocks its thread, as a long tokenization does
        with self.lock:
            self.active -= 1
        return self.inner.encode(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_tokenization_runs_off_the_event_loop_with_bounded_concurrency() -> None:
    ing = _ingress(max_concurrent_tokenizations=2)
    ing.tokenizer = slow = _SlowTokenizer(ing.tokenizer, 0.6)

    async def run() -> tuple[float, list[int]]:
        gaps, stop = [], asyncio.Event()

        async def heartbeat() -> None:  # what every other request of the replica needs: a free event loop
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        hb = asyncio.create_task(heartbeat())
        chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        calls = [ing.completions(_request(body=_completion())) for _ in range(4)]
        calls.append(ing.chat_completions(_request(body=chat, path="/v1/chat/completions")))
        resps = await asyncio.gather(*calls)
        stop.set()
        await hb
        return max(gaps), [r.status_code for r in resps]

    t0 = time.perf_counter()
    worst_gap, statuses = asyncio.run(run())
    assert statuses == [200] * 5
    assert worst_gap < 0.3, f"the event loop stalled for {worst_gap:.2f} s"  # on the loop: >= 0.6 s
    assert slow.peak == 2  # max_concurrent_tokenizations
    assert all(name.startswith("ernie-tokenize") for name in slow.threads), slow.threads
    assert time.perf_counter() - t0 >= 0.6 * 5 / 2 - 0.05  # 5 encodes of 0.6 s, two at a time


def test_prompt_too_long_for_the_context_is_refused_without_tokenizing() -> None:
    ing = _ingress(max_request_bytes=8 << 20)
    ing.tokenizer = slow = _SlowTokenizer(ing.tokenizer, 5.0)
    t0 = time.perf_counter()
    for prompt in ("x" * (ing.max_prompt_chars + 1), ["x" * 10, "y" * (ing.max_prompt_chars + 1)]):
        req = _request(body=json.dumps({"model": "m", "prompt": prompt}).encode())
        _assert_openai_error(*_json(asyncio.run(ing.completions(req))), 400, "context_length_exceeded")
    msgs = [{"role": "user", "content": "x" * (ing.max_prompt_chars // 2 + 1)}] * 2
    req = _request(body=json.dumps({"model": "m", "messages": msgs}).encode(), path="/v1/chat/completions")
    status, body = _json(asyncio.run(ing.chat_completions(req)))
    _assert_openai_error(status, body, 400, "context_length_exceeded")
    req = _request(body=json.dumps({"model": "m", "prompt": [5] * 10_000}).encode())  # token ids: no decode either
    _assert_openai_error(*_json(asyncio.run(ing.completions(req))), 400, "context_length_exceeded")
    assert slow.threads == [] and time.perf_counter() - t0 < 2.0


def test_models_card_names_the_model_not_its_path(tmp_path: Path) -> None:
    ckpt = tmp_path / "secret-dir" / "ckpt"
    ckpt.mkdir(parents=True)
    ing = _ingress(model_path=str(ckpt), model_name="ckpt")
    req = _request(path="/v1/models", method="GET")
    status, body = _json(asyncio.run(ing.models(req)))
    assert status == 200
    (card,) = body["data"]
    assert card["id"] == card["root"] == "ckpt" and card["owned_by"] and card["object"] == "model"
    assert str(tmp_path) not in json.dumps(body) and "secret-dir" not in json.dumps(body)


@pytest.mark.parametrize("required", [False, True])
def test_metrics_behind_the_key_on_request(required: bool) -> None:
    ing = _ingress(api_key=Secret(SECRET), metrics_require_key=required)
    route = type(ing).metrics  # the instance's `metrics` attribute is its ServingMetrics
    resp = asyncio.run(route(ing, _request(path="/metrics", method="GET")))
    if required:
        _assert_openai_error(*_json(resp), 401, "invalid_api_key")
    else:
        assert resp.status_code == 200 and b"ernie_requests_in_flight" in resp.body
    auth = {"authorization": f"Bearer {SECRET}"}
    resp = asyncio.run(route(ing, _request(path="/metrics", method="GET", headers=auth)))
    assert resp.status_code == 200 and b"ernie_engine_waiting" in resp.body
    # the completions route checks the key before reading the body
    req = _request(body=_completion())
    _assert_openai_error(*_json(asyncio.run(ing.completions(req))), 401, "invalid_api_key")
    assert req.state_reads["reads"] == 0


# ---- what the API fuzz found (tests/test_serve_fuzz.py) ------------------------------------------------------------
def test_subnormal_temperature_samples_greedily() -> None:
    """temperature=1e-320 divided the logits into inf/nan probabilities: the engine step failed, and with it every
    request of its batch (a 500 for all of them)."""
    from ernie_platform.serving.protocol import CompletionRequest, completion_sampling, parse_body

    for t, want in ((1e-320, 0.0), (5e-6, 0.0), (1e-5, 1e-5), (0.7, 0.7)):
        req = parse_body(_completion(temperature=t), CompletionRequest)
        assert completion_sampling(req, 8).params.temperature == want


def test_a_role_that_is_not_a_string_is_a_400() -> None:
    """`"role": ["user"]` raised TypeError (unhashable) in the dict lookup: a 500."""
    from ernie_platform.serving.chat import normalize_chat
    from ernie_platform.serving.protocol import APIError

    for role in (["user"], {"a": 1}, None, 3):
        with pytest.raises(APIError) as e:
            normalize_chat([{"role": role, "content": "x"}])
        assert e.value.status == 400 and e.value.param == "messages[0].role"


# ---- python -m workloads.serve for real: the key never reaches the disk --------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, key: Optional[str]) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _files_containing(root: Path, needle: bytes, skip: set[Path]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p in skip or p.is_symlink() or not p.is_file():
            continue
        try:
            if needle in p.read_bytes():
                hits.append(str(p))
        except OSError:  # sockets, files removed while scanning
            continue
    return hits


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("source", ["env", "file"])
def test_serve_command_keeps_the_key_off_disk(tmp_path: Path, source: str) -> None:
    """The real entrypoint (Hydra writes outputs/, its own Ray instance writes its session logs): requests without
    the key are 401, with it 200, and no file written by the run contains the key."""
    key = f"sk-{source}-{os.urandom(8).hex()}"
    port = _free_port()
    # a short private Ray temp dir (its unix sockets must fit 107 bytes) whose session logs are searched too
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_tmp)}
    env.pop(API_KEY_ENV, None)
    env.pop(LEGACY_API_KEY_ENV, None)
    cmd = [sys.executable, "-m", "workloads.serve", f"serve.port={port}", "serve.mode=colocated",
           f"run.storage_path={tmp_path / 'runs'}", f"hydra.run.dir={tmp_path / 'outputs'}"]  # fmt: skip
    key_file = tmp_path / "secrets" / "api-key"
    if source == "env":
        env[API_KEY_ENV] = key
    else:
        key_file.parent.mkdir()
        key_file.write_text(key + "\n")
        cmd.append(f"serve.api_key_file={key_file}")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        lines = read_until(proc, "[serve] ready")
        assert any("[serve] ready" in ln for ln in lines), "".join(lines)[-3000:]
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "ernie45-demo", "prompt": "Hello", "max_tokens": 2}
        assert [_post(url, body, k) for k in (None, "wrong", key)] == [401, 401, 200]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert key not in text  # nor on the console
    written = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written), written  # Hydra did write its files
    try:
        assert any(ray_tmp.rglob("session_*/logs/*")), "Ray's session logs are not under RAY_TMPDIR"
        hits = _files_containing(tmp_path, key.encode(), skip={key_file})
        hits += _files_containing(ray_tmp, key.encode(), set())
        assert hits == [], f"the API key was written to {hits}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
