"""Post-training data: record formats (SFT / DPO / RL), file reading and errors, chat encoding, packing, collation,
built-in verifiable tasks."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from ernie_platform.data import DataError, DataStats
from ernie_platform.models import load_tokenizer
from ernie_platform.posttrain.data import (
    PreferenceExample,
    RLExample,
    SFTExample,
    TooLong,
    builtin_examples,
    collate_preferences,
    encode_chat,
    encode_preference,
    encode_prompt,
    pack_sft,
    parse_preference,
    parse_rl,
    parse_sft,
    read_examples,
)
from ernie_platform.posttrain.tasks import (
    TASKS,
    Problem,
    _arithmetic_pools,
    arithmetic,
    counting,
    problems,
    wrong_answer,
)

TOK = load_tokenizer(None)
EOT = "<|end_of_sentence|>"
W = "f.jsonl:1"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _asst(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


# ---- parsers ---------------------------------------------------------------------------------------------------------
def test_parse_sft_erniekit_multi_turn_with_system():
    row = {"system": "Be brief.", "src": ["hi", "2+2?"], "tgt": ["hello", "4"]}
    ex = parse_sft(row, W)
    assert isinstance(ex, SFTExample)
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        _user("hi"),
        _asst("hello"),
        _user("2+2?"),
        _asst("4"),
    ]
    assert parse_sft({"src": "q", "tgt": "a"}, W).messages == [_user("q"), _asst("a")]


def test_parse_sft_alpaca_and_messages():
    assert parse_sft({"instruction": "Add", "input": "1 2", "output": "3"}, W).messages == [
        _user("Add\n1 2"),
        _asst("3"),
    ]
    no_input = parse_sft({"instruction": "Say hi", "input": "", "output": "hi", "system": "S"}, W)
    assert no_input.messages == [{"role": "system", "content": "S"}, _user("Say hi"), _asst("hi")]
    msgs = [{"role": "system", "content": "S"}, _user("q"), _asst("a")]
    assert parse_sft({"messages": msgs}, W).messages == msgs
    with pytest.raises(DataError, match=r"f\.jsonl:1: .*'messages' must end with a assistant"):
        parse_sft({"messages": [_user("q")]}, W)
    with pytest.raises(DataError, match=r"messages\[1\]\.role"):
        parse_sft({"messages": [_user("q"), {"role": "bot", "content": "a"}]}, W)


def test_parse_sft_errors_name_field():
    with pytest.raises(DataError, match=r"'src'/'tgt'.*same"):
        parse_sft({"src": ["a", "b"], "tgt": ["c"]}, W)
    with pytest.raises(DataError, match=r"'output'"):
        parse_sft({"instruction": "x"}, W)
    with pytest.raises(DataError, match=r"'tgt' must be a string or a list of strings"):
        parse_sft({"src": ["a"], "tgt": [1]}, W)
    with pytest.raises(DataError, match=r"not an SFT record"):
        parse_sft({"text": "x"}, W)


def test_parse_preference_erniekit_sort_picks_higher():
    row = {"system": "S", "src": ["hi", "2+2?"], "tgt": ["hello"], "response": [["4"], ["5"]], "sort": [1, 0]}
    ex = parse_preference(row, W)
    assert isinstance(ex, PreferenceExample)
    assert ex.messages == [{"role": "system", "content": "S"}, _user("hi"), _asst("hello"), _user("2+2?")]
    assert (ex.chosen, ex.rejected) == ("4", "5")
    flipped = parse_preference({"src": ["2+2?"], "response": [["5"], "4"], "sort": [0, 1]}, W)
    assert (flipped.chosen, flipped.rejected) == ("4", "5") and flipped.messages == [_user("2+2?")]
    with pytest.raises(DataError, match=r"'sort' has equal values"):
        parse_preference({"src": ["q"], "response": [["a"], ["b"]], "sort": [1, 1]}, W)
    with pytest.raises(DataError, match=r"len\(src\) == len\(tgt\) \+ 1"):
        parse_preference({"src": ["q"], "tgt": ["a"], "response": [["a"], ["b"]], "sort": [1, 0]}, W)


def test_parse_preference_question_chosen_rejected():
    ex = parse_preference({"question": "q", "chosen": "good", "rejected": "bad", "system": "S"}, W)
    assert ex.messages == [{"role": "system", "content": "S"}, _user("q")]
    assert (ex.chosen, ex.rejected) == ("good", "bad")
    assert parse_preference({"prompt": "p", "chosen": "c", "rejected": "r"}, W).messages == [_user("p")]
    with pytest.raises(DataError, match=r"'rejected'"):
        parse_preference({"prompt": "p", "chosen": "c"}, W)


def test_parse_rl_forms():
    ex = parse_rl({"prompt": "What is 1+1?", "ground_truth": "2", "task": "arithmetic", "system": "S"}, W)
    assert isinstance(ex, RLExample)
    assert ex.messages == [{"role": "system", "content": "S"}, _user("What is 1+1?")]
    assert (ex.ground_truth, ex.task) == ("2", "arithmetic")
    verl = parse_rl({"prompt": [_user("q")], "reward_model": {"ground_truth": 7}, "data_source": "gsm8k"}, W)
    assert (verl.messages, verl.ground_truth, verl.task) == ([_user("q")], 7, "gsm8k")
    src = parse_rl({"src": ["a", "b"], "ground_truth": [1, 2]}, W)
    assert src.messages == [_user("b")] and src.task is None
    hist = parse_rl({"src": ["a", "b"], "tgt": ["x"], "ground_truth": "1"}, W)
    assert hist.messages == [_user("a"), _asst("x"), _user("b")]
    with pytest.raises(DataError, match=r"'ground_truth'"):
        parse_rl({"prompt": "q"}, W)
    with pytest.raises(DataError, match=r"'reward_model.ground_truth'"):
        parse_rl({"prompt": [_user("q")], "reward_model": {"style": "rule"}}, W)


# ---- files -----------------------------------------------------------------------------------------------------------
def test_read_examples_jsonl_and_errors(tmp_path: Path):
    good = {"src": ["q"], "tgt": ["a"]}
    path = _jsonl(tmp_path / "file.jsonl", [good, good, {"src": ["q"]}, good])
    with pytest.raises(DataError, match=r"file\.jsonl:3: .*'tgt'"):
        read_examples(path, "sft")
    stats = DataStats()
    out = read_examples(path, "sft", on_error="skip", stats=stats)
    assert len(out) == 3 and all(isinstance(e, SFTExample) for e in out)
    assert (stats.records, stats.skipped) == (4, 1)

    bad_json = _jsonl(tmp_path / "j.jsonl", [good, "", '{"src": ["q"], "tgt":'])  # blank line 2 is skipped
    with pytest.raises(DataError, match=r"j\.jsonl:3: invalid JSON"):
        read_examples(bad_json, "sft")
    stats = DataStats()
    assert len(read_examples(bad_json, "sft", on_error="skip", stats=stats)) == 1
    assert stats.skipped == 1

    all_bad = _jsonl(tmp_path / "bad.jsonl", ["[1]", "nope"])
    with pytest.raises(DataError, match=re.escape(all_bad)):
        read_examples(all_bad, "sft", on_error="skip")
    with pytest.raises(DataError, match=r"does not exist"):
        read_examples(str(tmp_path / "missing.jsonl"), "sft")


def test_read_examples_glob_dpo_and_rl(tmp_path: Path):
    _jsonl(tmp_path / "a.jsonl", [{"src": ["q1"], "response": [["y"], ["n"]], "sort": [1, 0]}])
    _jsonl(tmp_path / "b.jsonl", [{"prompt": "q2", "chosen": "y", "rejected": "n"}])
    pairs = read_examples(str(tmp_path / "*.jsonl"), "dpo")
    assert [p.messages[-1]["content"] for p in pairs] == ["q1", "q2"]
    rl = tmp_path / "rl.jsonl"
    _jsonl(rl, [{"prompt": "What is 2+3?", "ground_truth": "5", "task": "arithmetic"}])
    (ex,) = read_examples(str(rl), "rl")
    assert (ex.messages, ex.ground_truth, ex.task) == ([_user("What is 2+3?")], "5", "arithmetic")


def test_read_examples_verl_parquet(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "data_source": ["openai/gsm8k", "openai/gsm8k", "openai/gsm8k"],
            "prompt": [[_user("1+1?")], [_user("2+2?")], [_user("3+3?")]],
            "ability": ["math"] * 3,
            "reward_model": [
                {"ground_truth": "2", "style": "rule"},
                {"ground_truth": "4", "style": "rule"},
                {"ground_truth": None, "style": "rule"},
            ],
        }
    )
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"train\.parquet:3: .*reward_model\.ground_truth"):
        read_examples(str(path), "rl")
    out = read_examples(str(path), "rl", on_error="skip")
    assert [(e.messages, e.ground_truth, e.task) for e in out] == [
        ([_user("1+1?")], "2", "openai/gsm8k"),
        ([_user("2+2?")], "4", "openai/gsm8k"),
    ]


def test_builtin_examples():
    sft = builtin_examples("sft", "train", 4, seed=0)
    assert all(e.messages[0]["role"] == "user" and e.messages[1]["role"] == "assistant" for e in sft)
    dpo = builtin_examples("dpo", "train", 4, seed=0)
    assert [e.messages for e in dpo] == [e.messages[:1] for e in sft]
    assert all(e.chosen == s.messages[1]["content"] != e.rejected for e, s in zip(dpo, sft))
    rl = builtin_examples("rl", "test", 6, seed=1, tasks=("arithmetic", "counting"))
    assert sorted(e.task for e in rl) == ["arithmetic"] * 3 + ["counting"] * 3
    assert builtin_examples("rl", "test", 6, seed=1, tasks=("arithmetic", "counting")) == rl


# ---- tokens ----------------------------------------------------------------------------------------------------------
def test_encode_chat_labels_are_assistant_turns():
    msgs = [{"role": "system", "content": "Be brief."}, _user("hi"), _asst("hello"), _user("2+2?"), _asst("4")]
    ids, labels = encode_chat(TOK, msgs)
    full = TOK.apply_chat_template(msgs, tokenize=False)
    assert ids == TOK(full, add_special_tokens=False)["input_ids"]
    assert len(labels) == len(ids)
    runs, cur = [], []
    for tid, lab in zip(ids, labels):
        if lab == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tid
            cur.append(lab)
    if cur:
        runs.append(cur)
    assert [TOK.decode(r) for r in runs] == ["hello" + EOT, "4" + EOT]
    with pytest.raises(TooLong):
        encode_chat(TOK, msgs, max_len=len(ids) - 1)
    assert encode_chat(TOK, msgs, max_len=len(ids))[0] == ids


def test_encode_chat_label_zero_turn_is_context():
    ex = parse_sft({"src": ["a", "b"], "tgt": ["x", "y"], "label": [0, 1]}, W)
    ids, labels = encode_chat(TOK, ex.messages)
    assert TOK.decode([t for t in labels if t != -100]) == "y" + EOT


def test_encode_prompt_and_preference():
    ex = PreferenceExample([_user("2+2?")], "4", "5")
    prompt = encode_prompt(TOK, ex.messages)
    assert TOK.decode(prompt).endswith("User: 2+2?\nAssistant: ")
    enc = encode_preference(TOK, ex, max_len=64)
    assert enc["prompt_len"] == len(prompt)
    for key, text in (("chosen", "4"), ("rejected", "5")):
        ids, labels = enc[key]
        assert ids[: len(prompt)] == prompt
        assert labels[: len(prompt)] == [-100] * len(prompt)
        assert TOK.decode(labels[len(prompt) :]) == text + EOT
        full = TOK.apply_chat_template(ex.messages + [_asst(text)], tokenize=False)
        assert ids == TOK(full, add_special_tokens=False)["input_ids"]
    with pytest.raises(TooLong):
        encode_preference(TOK, ex, max_len=len(prompt))


# ---- batches ---------------------------------------------------------------------------------------------------------
def test_pack_sft_rows_positions_masks_labels():
    rng = random.Random(0)
    examples = [encode_chat(TOK, [_user("q" * rng.randint(1, 12)), _asst("a" * rng.randint(1, 12))]) for _ in range(9)]
    seq_len, b = 64, 2
    batches = list(pack_sft(examples, seq_len, b))
    targets = sum(sum(1 for t in labels if t != -100) for _, labels in examples)
    seen_targets = 0
    placed = 0
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (b, seq_len)
        assert batch["attention_mask"].shape == (b, 1, seq_len, seq_len) and batch["attention_mask"].dtype == torch.bool
        seen_targets += int((batch["labels"] != -100).sum())
        for r in range(b):
            pos, mask = batch["position_ids"][r], batch["attention_mask"][r, 0]
            seg_starts = [i for i in range(seq_len) if pos[i] == 0]
            bounds = seg_starts + [seq_len]
            for s, e in zip(bounds, bounds[1:]):
                assert pos[s:e].tolist() == list(range(e - s))
                assert torch.equal(mask[s:e, s:e], torch.ones(e - s, e - s, dtype=torch.bool).tril())
                assert not mask[s:e, :s].any() and not mask[s:e, e:].any()  # never across examples
            ids_row = batch["input_ids"][r].tolist()
            for s, e in zip(bounds, bounds[1:]):
                if ids_row[s] == 0:  # padding segment
                    assert set(ids_row[s:e]) == {0} and (batch["labels"][r, s:e] == -100).all()
                else:
                    assert ids_row[s:e] == examples[placed][0]  # whole examples, in order
                    placed += 1
    assert placed == len(examples) and seen_targets == targets
    rows = sum(int((batch["input_ids"][:, 0] != 0).sum()) for batch in batches)
    assert len(batches) == -(-rows // b) and len(list(pack_sft(examples, seq_len, b, drop_last=True))) == rows // b
    with pytest.raises(TooLong):
        list(pack_sft([([1] * 10, [1] * 10)], 8, 1))


def test_collate_preferences_shapes_and_masks():
    exs = [PreferenceExample([_user("2+2?")], "4", "five"), PreferenceExample([_user("a much longer q")], "yes", "n")]
    enc = [encode_preference(TOK, e) for e in exs]
    batch = collate_preferences(enc)
    lens = [len(p["chosen"][0]) for p in enc] + [len(p["rejected"][0]) for p in enc]
    t = max(lens)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, t)
    assert batch["attention_mask"].sum(-1).tolist() == lens
    for i, (ids, labels) in enumerate([p["chosen"] for p in enc] + [p["rejected"] for p in enc]):
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids and (batch["input_ids"][i, n:] == 0).all()
        assert batch["labels"][i, :n].tolist() == labels and (batch["labels"][i, n:] == -100).all()
    assert TOK.decode([x for x in batch["labels"][2].tolist() if x != -100]) == "five" + EOT


# ---- tasks -----------------------------------------------------------------------------------------------------------
def _triple(p: Problem) -> tuple:
    return tuple(re.fullmatch(r"What is (\d+)([+-])(\d+)\?", p.prompt).groups())


def test_arithmetic_deterministic_correct_and_disjoint():
    train = arithmetic("train", 2000, seed=0)
    assert train == arithmetic("train", 2000, seed=0) and train != arithmetic("train", 2000, seed=1)
    test = arithmetic("test", 2000, seed=0)  # more than the test pool: drawn with replacement
    assert not {_triple(p) for p in train} & {_triple(p) for p in test}
    for p in train + test:
        a, op, b = _triple(p)
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    ops = [_triple(p)[1] for p in train]
    assert 0.4 < ops.count("+") / len(ops) < 0.6
    assert len({_triple(p) for p in train}) == len(train)  # the train pool is large: no repeats


def test_counting_deterministic_correct_and_disjoint():
    train, test = counting("train", 500, seed=0), counting("test", 200, seed=0)
    assert train == counting("train", 500, seed=0)
    pat = r"How many times does the letter '([a-e])' appear in '([a-e]{3,10})'\?"
    keys = {}
    for split, probs in (("train", train), ("test", test)):
        keys[split] = set()
        for p in probs:
            letter, word = re.fullmatch(pat, p.prompt).groups()
            assert p.answer == str(word.count(letter)) and p.task == "counting"
            keys[split].add((letter, word))
    assert not keys["train"] & keys["test"]


def test_held_out_examples_distinct_deterministic_and_disjoint_from_training():
    """The end-of-run evaluation (`algorithms.examples(cfg, kind, "test")`) asks for distinct problems: every test
    problem of operands 0-50 at most once, the same set whatever the seed, none of them a training problem."""
    from ernie_platform.posttrain.algorithms import examples

    def cfg(seed: int, test_percent: int, eval_samples: int = 4000) -> dict:
        algo = {"tasks": ["arithmetic"], "max_operand": 50, "test_percent": test_percent}
        algo.update(name="rlvr", train_samples=20000, eval_samples=eval_samples, eval_source=None)
        return {"algo": algo, "data": {"source": "builtin"}, "trainer": {"seed": seed}}

    for pct, size in ((10, 391), (30, 1148)):  # 3,927 problems with operands 0-50 (2,601 sums, 1,326 differences)
        held = examples(cfg(0, pct), "rl", "test")
        prompts = [ex.messages[-1]["content"] for ex in held]
        assert len(prompts) == len(set(prompts)) == size
        assert set(prompts) == {ex.messages[-1]["content"] for ex in examples(cfg(5, pct), "rl", "test")}
        assert examples(cfg(0, pct), "rl", "test") == held  # deterministic order too
        train = {ex.messages[-1]["content"] for ex in examples(cfg(0, pct), "rl", "train")}
        assert not train & set(prompts)
        pools = _arithmetic_pools(50, pct)
        assert len(pools[("train", "+")] + pools[("train", "-")]) == {10: 3536, 30: 2779}[pct]
        assert len(train) == {10: 3508, 30: 2772}[pct]  # 20,000 training draws see almost all of them
    small = [ex.messages[-1]["content"] for ex in examples(cfg(0, 30, eval_samples=500), "rl", "test")]
    assert len(set(small)) == 500
    # the test splits are nested: the 10% held-out problems are held out at 30% as well
    assert {_triple(p) for p in arithmetic("test", 4000, 0, 50, distinct=True)} <= {
        _triple(p) for p in arithmetic("test", 4000, 0, 50, test_percent=30, distinct=True)
    }
    both = problems(
        ["arithmetic", "counting"],
        "test",
        3000,
        seed=1,
        options={"arithmetic": {"max_operand": 50, "distinct": True}, "counting": {"distinct": True}},
    )
    assert len({p.prompt for p in both}) == len(both) == 391 + 1500  # arithmetic's split is exhausted at 391
    with pytest.raises(ValueError, match="test_percent"):
        arithmetic("test", 1, seed=0, test_percent=0)


def test_problems_mix_and_unknown_task():
    mixed = problems(["arithmetic", "counting"], "train", 7, seed=3)
    assert [p.task for p in mixed].count("arithmetic") == 4 and len(mixed) == 7
    assert mixed == problems(["arithmetic", "counting"], "train", 7, seed=3)
    assert set(TASKS) == {"arithmetic", "counting"}
    with pytest.raises(ValueError, match="'sudoku'"):
        problems(["arithmetic", "sudoku"], "train", 4, seed=0)
    with pytest.raises(ValueError, match="split"):
        arithmetic("val", 1, seed=0)


def test_wrong_answer_never_right_nor_negative():
    rng = random.Random(0)
    probs = arithmetic("train", 300, seed=0) + counting("train", 300, seed=0) + [Problem("q", "0", "x")]
    for p in probs:
        for _ in range(3):
            w = wrong_answer(p, rng)
            assert w != p.answer and int(w) >= 0
    assert {wrong_answer(Problem("q", "82", "x"), rng) for _ in range(100)} == {"81", "83", "72", "92", "28"}
