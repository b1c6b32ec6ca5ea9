"""Inference engine: greedy parity with full forwards and transformers, continuous batching, KV budget queueing,
sampling, stop strings, streaming detokenization, logprobs, prefill/decode transfer, asyncio front."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest
import torch

from ernie_platform.inference import AsyncEngine, Engine, PrefillResult, SamplingParams
from ernie_platform.inference.detokenize import IncrementalDetokenizer
from ernie_platform.models import ErnieForCausalLM, load_pretrained, load_tokenizer

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops on a shared 2-core box: intra-op threads only add contention (100x slower decode steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tiny_moe_ckpt: Path) -> Path:
    return tiny_moe_ckpt


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return Engine.from_pretrained(str(ckpt), max_batch_size=4, max_seq_len=64)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(16, 272, (n,), generator=g).tolist()


def _alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return engine.generate_batch([prompt], params)[0].output_ids


def test_greedy_equals_full_forward_argmax_and_transformers(engine: Engine, ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompts = [_prompt(5, 1), _prompt(9, 2)]
    got = [c.output_ids for c in engine.generate_batch(prompts, GREEDY)]
    model = load_pretrained(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    for prompt, out in zip(prompts, got):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(GREEDY.max_tokens):  # no cache: the whole sequence each time
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8)
        assert out == seq[len(prompt) :]
        assert out == ref[0, len(prompt) :].tolist()


def test_continuous_batching_matches_each_alone(engine: Engine) -> None:
    reqs = {  # id: (prompt, max_tokens, step at which it is added)
        "a": (_prompt(5, 3), 9, 0),
        "b": (_prompt(11, 4), 4, 0),
        "c": (_prompt(3, 5), 7, 2),
        "d": (_prompt(7, 6), 6, 3),
        "e": (_prompt(2, 7), 5, 3),  # 5 requests on 4 rows: e waits for a free row
    }
    alone = {rid: _alone(engine, p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
             for rid, (p, m, _) in reqs.items()}  # fmt: skip
    out: dict[str, list[int]] = {rid: [] for rid in reqs}
    step = 0
    while step < 4 or engine.has_work():
        for rid, (p, m, at) in reqs.items():
            if at == step:
                engine.add_request(rid, p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        for rid, evs in engine.step().items():
            out[rid] += [e.token_id for e in evs]
        step += 1
    assert out == alone
    assert engine.stats()["running"] == 0 and engine.stats()["kv_used_tokens"] == 0


def test_budget_queues_requests_and_never_drops(ckpt: Path) -> None:
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eng = Engine.from_pretrained(str(ckpt), max_batch_size=8, max_seq_len=32, kv_budget_tokens=2 * (6 + 6))
    prompts = [_prompt(6, 10 + i) for i in range(5)]
    for i, prompt in enumerate(prompts):
        eng.add_request(f"r{i}", prompt, p)
    assert eng.stats()["waiting"] == 5
    done = {rid: [e.token_id for e in evs] for rid, evs in eng.step().items()}
    s = eng.stats()
    assert (s["waiting"], s["running"], s["kv_used_tokens"], s["kv_usage"]) == (3, 2, 24, 1.0)
    while eng.has_work():
        for rid, evs in eng.step().items():
            done.setdefault(rid, []).extend(e.token_id for e in evs)
            assert eng.stats()["kv_used_tokens"] <= 24
    assert sorted(done) == [f"r{i}" for i in range(5)]
    assert all(len(v) == 6 for v in done.values())
    with pytest.raises(ValueError, match="kv_budget_tokens=24"):
        eng.add_request("big", _prompt(20, 0), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        eng.add_request("long", _prompt(30, 0), SamplingParams(max_tokens=3))


def test_seeds_top_k_and_n(engine: Engine) -> None:
    prompt = _prompt(6, 20)
    hot = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    a = _alone(engine, prompt, hot)
    batched = engine.generate_batch([_prompt(4, 21), prompt, _prompt(9, 22)], [GREEDY, hot, hot])
    assert batched[1].output_ids == a  # same seed + prompt, whatever else is batched
    other = _alone(engine, prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=8, ignore_eos=True))
    assert other != a
    top1 = SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    assert _alone(engine, prompt, top1) == _alone(engine, prompt, GREEDY)
    nucleus = SamplingParams(max_tokens=8, temperature=0.7, top_p=1e-6, ignore_eos=True)
    assert _alone(engine, prompt, nucleus) == _alone(engine, prompt, GREEDY)
    two = engine.generate_batch([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=2, ignore_eos=True))
    assert [c.index for c in two] == [0, 1] and two[0].output_ids == a and two[1].output_ids == other


class ScriptedLM(torch.nn.Module):
    """Runs the real model (so the cache advances) but makes token `script[i]` the only choice at output step i."""

    def __init__(self, inner: ErnieForCausalLM, prompt_len: int, script: list[int]):
        super().__init__()
        self.inner, self.args, self.prompt_len, self.script = inner, inner.args, prompt_len, script

    def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0, **kw):
        out = self.inner(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=logits_to_keep, **kw)
        forced = torch.full_like(out.logits, -30.0)
        for b, n in enumerate(cache.lengths_B.tolist()):
            i = n - self.prompt_len
            forced[b, -1, self.script[i] if 0 <= i < len(self.script) else 0] = 30.0
        out.logits = forced
        return out


def _scripted(ckpt: Path, text: str) -> tuple[Engine, list[int]]:
    tok = load_tokenizer(None)
    script = tok.encode(text)
    return Engine(ScriptedLM(load_pretrained(ckpt), 3, script), tok, max_batch_size=2, max_seq_len=64), script


def test_streaming_never_splits_multibyte_chars(ckpt: Path) -> None:
    text = "héllo 中文 ok!"
    eng, script = _scripted(ckpt, text)
    assert len(script) > len(text)  # é and 中文 span several byte tokens
    eng.add_request("s", [20, 21, 22], SamplingParams(max_tokens=len(script), temperature=0, ignore_eos=True))
    events = []
    while eng.has_work():
        events += eng.step().get("s", [])
    assert [e.token_id for e in events] == script
    assert all("\ufffd" not in e.text for e in events)
    assert any(e.text == "" for e in events)  # held while a character is incomplete
    assert "".join(e.text for e in events) == text == eng.tokenizer.decode(script)
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


@pytest.mark.parametrize(
    ("stop", "expect"), [(["中"], "héllo "), (["lo 中文", "xyz"], "hél"), (["k!"], "héllo 中文 o")]
)
def test_stop_strings_truncate_text_and_stream_consistently(ckpt: Path, stop: list[str], expect: str) -> None:
    eng, script = _scripted(ckpt, "héllo 中文 ok!")
    params = SamplingParams(max_tokens=len(script), temperature=0, stop=stop, ignore_eos=True)
    eng.add_request("s", [20, 21, 22], params)
    events = []
    while eng.has_work():
        events += eng.step().get("s", [])
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == expect
    eng2, _ = _scripted(ckpt, "héllo 中文 ok!")
    [c] = eng2.generate_batch([[20, 21, 22]], params)
    assert c.text == expect and c.finish_reason == "stop" and c.output_ids == [e.token_id for e in events]


def test_eos_stops_and_length_finishes(engine: Engine) -> None:
    prompt = _prompt(5, 30)
    free = _alone(engine, prompt, GREEDY)
    saved = set(engine.eos_token_ids)
    try:
        engine.eos_token_ids = {free[2]}
        [c] = engine.generate_batch([prompt], SamplingParams(max_tokens=8, temperature=0))
        assert c.output_ids == free[: free.index(free[2]) + 1] and c.finish_reason == "stop"
    finally:
        engine.eos_token_ids = saved
    [c] = engine.generate_batch([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert c.finish_reason == "length" and len(c.output_ids) == 3


def test_logprobs_match_full_forward(engine: Engine, ckpt: Path) -> None:
    prompt = _prompt(6, 40)
    [c] = engine.generate_batch([prompt], SamplingParams(max_tokens=5, temperature=0.8, seed=1, logprobs=3,
                                                         ignore_eos=True))  # fmt: skip
    model = load_pretrained(ckpt)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + c.output_ids])).logits[0].float(), -1)
    assert len(c.logprobs) == 5
    for i, lp in enumerate(c.logprobs):
        assert lp.token_id == c.output_ids[i] and lp.logprob <= 0
        assert lp.logprob == pytest.approx(ref[len(prompt) - 1 + i, lp.token_id].item(), abs=1e-4)
        assert len(lp.top_logprobs) == 3 and all(v <= 0 for v in lp.top_logprobs.values())
        assert max(lp.top_logprobs.values()) == pytest.approx(ref[len(prompt) - 1 + i].max().item(), abs=1e-4)


def test_prefill_decode_transfer_between_engines(engine: Engine, ckpt: Path) -> None:
    decoder = Engine.from_pretrained(str(ckpt), max_batch_size=2, max_seq_len=64)
    prompt = _prompt(7, 50)
    for params in (GREEDY, SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)):
        colocated = engine.generate_batch([prompt], params)[0]
        pr = pickle.loads(pickle.dumps(engine.prefill(prompt, params)))
        assert isinstance(pr, PrefillResult) and pr.first.token_id == colocated.output_ids[0]
        assert all(k.device.type == "cpu" and k.shape[1] == len(prompt) for k, _ in pr.kv)
        decoder.add_request("pd", pr, params)
        events = []
        while decoder.has_work():
            events += decoder.step().get("pd", [])
        assert [e.token_id for e in events] == colocated.output_ids
        assert "".join(e.text for e in events) == colocated.text
    assert decoder.stats()["prefills_imported"] == 2 and decoder.stats()["prefills_local"] == 0


def test_batched_prefill_results_carry_only_their_own_kv(engine: Engine) -> None:
    """The longest prompt's KV rows are a contiguous slice of the batch's prefill cache: the PrefillResult must not
    share (and pickle) the whole batch's storage."""
    prompts = [_prompt(9, 60), _prompt(4, 61), _prompt(6, 62)]
    results = engine.prefill_batch(prompts, [GREEDY] * len(prompts))
    for prompt, result in zip(prompts, results):
        for k, v in result.kv:
            for t in (k, v):
                assert t.shape[1] == len(prompt) and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_async_engine_streams_and_cancellation_aborts(engine: Engine) -> None:
    aeng = AsyncEngine(engine)
    prompt = _prompt(5, 60)
    want = engine.generate_batch([prompt], GREEDY)[0]

    async def main() -> None:
        events = [e async for e in aeng.generate("x", prompt, GREEDY)]
        assert [e.token_id for e in events] == want.output_ids
        assert "".join(e.text for e in events) == want.text and events[-1].finish_reason == "length"
        pr = await aeng.prefill(prompt, GREEDY)
        assert [e.token_id async for e in aeng.generate("y", pr, GREEDY)] == want.output_ids

        async def consume_two(started: asyncio.Event) -> None:
            async for _ in aeng.generate("z", prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)):
                started.set()

        started = asyncio.Event()
        finished_before = engine.stats()["requests_finished"]
        task = asyncio.create_task(consume_two(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not engine.has_work():
                break
            await asyncio.sleep(0.01)
        s = engine.stats()
        assert s["running"] == 0 and s["kv_used_tokens"] == 0
        assert s["requests_finished"] == finished_before  # aborted, not run to max_tokens

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"temperature": -1}, "temperature=-1 must be >= 0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_k": -2}, "top_k=-2"),
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"n": 0}, "n=0"),
        ({"logprobs": -1}, "logprobs=-1"),
        ({"stop": [""]}, "stop="),
        ({"seed": -5}, "seed=-5"),
    ],
)
def test_bad_params_name_the_field(engine: Engine, kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw).validate()
    with pytest.raises(ValueError, match=msg):
        engine.add_request("bad", [20, 21], SamplingParams(**kw))


def test_detokenizer_state_round_trips() -> None:
    tok = load_tokenizer(None)
    d = IncrementalDetokenizer(["!"])
    ids = tok.encode("中a!")
    out = d.add(tok, ids[0])
    d = IncrementalDetokenizer.from_state(pickle.loads(pickle.dumps(d.state())))
    for t in ids[1:]:
        out += d.add(tok, t)
    assert out == "中a" and d.stopped
