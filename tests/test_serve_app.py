"""The Ray Serve OpenAI app over real HTTP with the official `openai` client: both modes (pd and colocated) deployed
once for the module on a tiny checkpoint, greedy parity with transformers, streaming, concurrency, the bad-input
matrix, the API key, metrics, and a decode replica killed under load (last: it disturbs the pd app)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import ray
from serve_cases import (
    BAD,
    BAD_CHAT,
    LONG,
    MODEL,
    SHORT,
    TIMEOUT,
    check_models_health_and_greedy_parity,
    check_streamed_equals_non_streamed,
    kill_replica_under_load,
)
from serve_cases import assert_error as _assert_error
from serve_cases import free_port as _free_port
from serve_cases import post as _post

from ernie_platform.models import load_tokenizer
from ernie_platform.serving.chat import encode_chat, render_chat

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "sk-test-key"
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True, "return_token_ids": True})


@pytest.fixture(scope="module")
def ckpt(tiny_moe_ckpt: Path) -> Path:
    return tiny_moe_ckpt


@pytest.fixture(scope="module")
def urls(ray_local, ckpt: Path) -> Any:
    from ray import serve

    from workloads.serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"model.path": str(ckpt), "serve.engine.max_seq_len": 256, "serve.engine.max_batch_size": 16}
    with pytest.MonkeyPatch.context() as mp:  # the key comes from the environment of the process building the app
        mp.delenv("ERNIE_API_KEY", raising=False)
        mp.delenv("ERNIE_SERVE_API_KEY", raising=False)
        pd = build_app({**common, "serve.mode": "pd", "serve.disagg_min_prompt_tokens": 8})
        mp.setenv("ERNIE_API_KEY", KEY)
        colo = build_app({**common, "serve.mode": "colocated"})
    serve.run_many([serve.RunTarget(pd, name="pd", route_prefix="/pd"),
                    serve.RunTarget(colo, name="colo", route_prefix="/colo")])  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    yield {"pd": f"{base}/pd", "colo": f"{base}/colo"}
    serve.shutdown()


def _client(urls: dict, mode: str, **kw: Any) -> openai.OpenAI:
    key = KEY if mode == "colo" else "unused"
    return openai.OpenAI(base_url=f"{urls[mode]}/v1", api_key=key, timeout=TIMEOUT, max_retries=0, **kw)


def test_models_health_and_greedy_parity_with_transformers(urls: dict, ckpt: Path) -> None:
    modes = ("pd", "colo")
    check_models_health_and_greedy_parity([urls[m] for m in modes], [_client(urls, m) for m in modes], ckpt)


@pytest.mark.parametrize("mode", ["pd", "colo"])
def test_streamed_equals_non_streamed(urls: dict, mode: str) -> None:
    check_streamed_equals_non_streamed(_client(urls, mode))


def test_sse_framing_on_the_wire(urls: dict) -> None:
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(f"{urls['pd']}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] == 5 and payloads[-1]["choices"] == []
    assert all(p["usage"] is None for p in payloads[:-1])


def test_sampling_options(urls: dict) -> None:
    c = _client(urls, "pd")
    seeded = dict(model=MODEL, prompt=LONG, max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=3,
                  extra_body={"top_k": 20, "ignore_eos": True, "return_token_ids": True})  # fmt: skip
    a, b = c.completions.create(**seeded), c.completions.create(**seeded)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.token_ids for ch in a.choices] == [ch.token_ids for ch in b.choices]  # seeded: reproducible
    assert len({tuple(ch.token_ids) for ch in a.choices}) > 1  # choice i uses seed + i
    assert a.usage.completion_tokens == 36
    lp = c.completions.create(model=MODEL, prompt=SHORT, max_tokens=4, temperature=0, logprobs=2,
                              extra_body={"ignore_eos": True}).choices[0].logprobs  # fmt: skip
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    r = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": SHORT}],
        max_completion_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    # stop: cut right before the first occurrence of a piece of the greedy text
    full = c.completions.create(model=MODEL, prompt=LONG, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    pieces = [text[i : i + 2] for i in range(1, len(text) - 2) if text[i : i + 2].isprintable()]
    if pieces:
        stop = pieces[0]
        r = c.completions.create(model=MODEL, prompt=LONG, max_tokens=40, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True})  # fmt: skip
        assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_thinking_mode_returns_reasoning_content(urls: dict, ckpt: Path) -> None:
    tok = load_tokenizer(ckpt)
    c = _client(urls, "colo")
    msgs = [{"role": "user", "content": SHORT}]
    args = dict(model=MODEL, messages=msgs, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    off = c.chat.completions.create(**args)
    assert not getattr(off.choices[0].message, "reasoning_content", None)
    on = c.chat.completions.create(
        **{**args, "extra_body": {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": True}}}
    )
    assert on.usage.prompt_tokens == len(encode_chat(tok, render_chat(tok, msgs, enable_thinking=True)))
    msg = on.choices[0].message.model_dump()
    assert isinstance(msg["reasoning_content"], str) and isinstance(msg["content"], str)
    meta = c.chat.completions.create(**{**args, "metadata": {"enable_thinking": "true"}})
    assert meta.choices[0].message.model_dump() == msg  # the same request, switched on through metadata
    chunks = list(c.chat.completions.create(stream=True, **{**args, "metadata": {"enable_thinking": "true"}}))
    streamed = "".join((ch.choices[0].delta.model_dump().get("reasoning_content") or "") for ch in chunks)
    assert streamed == msg["reasoning_content"]


def test_32_concurrent_requests(urls: dict) -> None:
    prompts = [SHORT, LONG, "Serving ERNIE", "0123456789 abcdefghij"]
    c = _client(urls, "pd")
    expect = {p: c.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].token_ids for p in prompts}

    async def run() -> list[tuple[str, list[int]]]:
        ac = openai.AsyncOpenAI(base_url=f"{urls['pd']}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)

        async def one(i: int) -> tuple[str, list[int]]:
            p = prompts[i % len(prompts)]
            if i % 2:
                r = await ac.completions.create(model=MODEL, prompt=p, **GREEDY)
                return p, r.choices[0].token_ids
            ids: list[int] = []
            async for ch in await ac.completions.create(model=MODEL, prompt=p, stream=True, **GREEDY):
                for choice in ch.choices:
                    ids += choice.token_ids
            return p, ids

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await ac.close()

    results = asyncio.run(run())
    assert len(results) == 32 and all(ids == expect[p] for p, ids in results)


def test_bad_input_matrix_then_a_good_request(urls: dict) -> None:
    url = urls["pd"]
    for body, status, param in BAD:
        raw = body if isinstance(body, bytes) else None
        _assert_error(*_post(f"{url}/v1/completions", body, raw=raw), status, param)
    for body, status, param in BAD_CHAT:
        _assert_error(*_post(f"{url}/v1/chat/completions", body), status, param)
    st, body = _post(f"{url}/v1/nope", {})
    _assert_error(st, body, 404, None)
    msg = _post(f"{url}/v1/chat/completions", BAD_CHAT[4][0])[1]["error"]["message"]
    assert "vision-language" in msg and "text-only" in msg
    r = _client(urls, "pd").completions.create(model=MODEL, prompt=LONG, **GREEDY)  # still serving
    assert len(r.choices[0].token_ids) == 8


def test_api_key(urls: dict) -> None:
    url = f"{urls['colo']}/v1/completions"
    body = {"model": MODEL, "prompt": SHORT, "max_tokens": 2}
    for key in (None, "wrong"):
        st, err = _post(url, body, key=key)
        _assert_error(st, err, 401, None)
        assert err["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{urls['colo']}/v1", api_key="wrong", max_retries=0).models.list()
    assert _post(url, body, key=KEY)[0] == 200


def test_metrics_text(urls: dict) -> None:
    with urllib.request.urlopen(f"{urls['pd']}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    for name in ("ernie_time_to_first_token_seconds_bucket", "ernie_inter_token_latency_seconds_bucket",
                 "ernie_e2e_request_latency_seconds_count", "ernie_requests_in_flight", 'ernie_engine_waiting{',
                 'ernie_engine_running_seqs{', 'ernie_engine_kv_usage{deployment="Decode"',
                 'ernie_engine_prefills_imported{deployment="Decode"'):  # fmt: skip
        assert name in text, name

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    assert value('ernie_prefill_route_total{route="disaggregated"}') > 0
    assert value('ernie_prefill_route_total{route="local"}') > 0
    assert value('ernie_requests_total{endpoint="completions",status="400"}') > 0
    assert value("ernie_time_to_first_token_seconds_count") > 0


def test_engine_deployments_route_by_load(urls: dict) -> None:
    """serve.router=load (the default): every engine deployment runs our request router, its replicas report their
    load, a handle's router receives the reports and counts the requests it has in flight (docs/balance.md)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from ernie_platform.balance import ReplicaLoad
    from ernie_platform.inference import SamplingParams

    apps = _get_global_client().get_serve_details()["applications"]
    for app, dep, cls in (("pd", "Prefill", "PrefillLoadRouter"), ("pd", "Decode", "DecodeLoadRouter"),
                          ("colo", "Engine", "DecodeLoadRouter")):  # fmt: skip
        rc = apps[app]["deployments"][dep]["deployment_config"]["request_router_config"]
        assert rc["request_router_class"] == f"ernie_platform.serving.router.{cls}", rc
        assert rc["request_routing_stats_period_s"] == 1.0
    h = serve.get_deployment_handle("Decode", app_name="pd")
    actor = ray.get_actor(h.actor_name.remote().result(timeout_s=TIMEOUT), namespace="serve")
    report = ray.get(actor.record_routing_stats.remote(), timeout=TIMEOUT)  # what Serve's controller polls
    assert ReplicaLoad.from_stats(report) is not None and report["max_seqs"] == 16, report
    router = h._router._asyncio_router.request_router  # Serve internals: the handle's request router
    assert type(router).__name__ == "DecodeLoadRouter" and router.role == "decode"
    (replica,) = router.curr_replicas.values()
    deadline = time.time() + 30
    while ReplicaLoad.from_stats(replica.routing_stats) is None:  # forwarded by the controller within a period
        assert time.time() < deadline, "no routing stats reached the router"
        time.sleep(0.2)
    stream = h.options(stream=True).generate.remote("route-1", [16] * 12, SamplingParams(max_tokens=40,
                                                    temperature=0, ignore_eos=True, n=2), False)  # fmt: skip
    next(iter(stream))
    inflight = router.policy.tracker.pending(replica.replica_id)
    assert (inflight.requests, inflight.seqs, inflight.kv_tokens) == (1, 2, 2 * (12 + 40))
    assert sum(len(toks) for toks in stream) > 0
    deadline = time.time() + 10
    while router.policy.tracker.pending(replica.replica_id).requests:  # dropped when the request completes
        assert time.time() < deadline, "a completed request still counts as in flight"
        time.sleep(0.1)


def _engine_stat(url: str, key: str, deployment: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    prefix = f'ernie_engine_{key}{{deployment="{deployment}"'
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


@pytest.mark.parametrize(("mode", "deployment"), [("pd", "Decode"), ("colo", "Engine")])
def test_client_disconnect_aborts_the_request(urls: dict, mode: str, deployment: str) -> None:
    import http.client

    before = _engine_stat(urls[mode], "tokens_generated", deployment)
    host, port = urls[mode].split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 200, "stream": True, "ignore_eos": True}
    conn.request("POST", f"/{mode}/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(4):  # role-less completion chunks: a couple of tokens are out
        resp.fp.readline()
    conn.sock.close()
    conn.close()
    deadline = time.time() + 30
    while _engine_stat(urls[mode], "running_seqs", deployment) > 0:
        assert time.time() < deadline, "the request kept running after the client left"
        time.sleep(0.1)
    assert _engine_stat(urls[mode], "tokens_generated", deployment) - before < 200  # stopped early, not finished


def test_decode_replica_killed_under_load(urls: dict) -> None:
    """Kill the Decode replica while streams run: each request completes or fails cleanly (an HTTP error, or an SSE
    error event then `[DONE]`), none hangs, no stream is silently cut short, and Serve's replacement replica serves
    again (the API key is on the colocated app only, so the keyless client of the helper fits the pd app)."""
    kill_replica_under_load(urls["pd"], "pd", "Decode", LONG, TIMEOUT)
