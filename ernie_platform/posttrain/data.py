"""Post-training data: SFT / preference (DPO) / RL prompt records → normalized examples → token ids → batches.

Record shapes (one JSON object per line in .jsonl/.json files, one row in .parquet files):

* SFT (`parse_sft`):
  - ERNIEKit: `{"system"?: str, "src": [user, ...], "tgt": [assistant, ...], "label"?: [0|1, ...]}` (turn i is
    src[i] then tgt[i]; a plain string is one turn; `label` 0 keeps a turn as context without loss);
  - alpaca: `{"instruction", "input"?, "output", "system"?}` (user = instruction + "\\n" + input when input is set);
  - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}` ending with an assistant turn.
* preference (`parse_preference`):
  - ERNIEKit DPO: `{"system"?, "src": [...], "tgt": [...], "response": [[a], [b]], "sort": [x, y]}` with
    len(src) == len(tgt) + 1 (history turns, then the prompt); the response with the higher sort value is chosen;
  - `{"prompt" | "question": str | messages, "chosen": str, "rejected": str, "system"?}`.
* RL prompts (`parse_rl`): `{"prompt": str | messages, "ground_truth", "task"?, "system"?}`; verl's parquet rows
  `{"prompt": messages, "reward_model": {"ground_truth"}, "data_source"?}` (task = data_source); or ERNIEKit-style
  `{"src": str | [...], "tgt"?: [...], "ground_truth"}` (the last src is the prompt).

Bad records raise `DataError("file:line: ...")` naming the field; `read_examples(..., on_error="skip")` drops them and
counts them in `DataStats.skipped` instead.

Tokens: `encode_chat` renders the tokenizer's chat template and trains on what the template adds for each assistant
message after the generation prompt (the content and the end-of-turn text, e.g. `<|end_of_sentence|>`), so the
model learns to stop. `pack_sft` packs whole examples into [B, T] rows with block-diagonal causal attention;
`collate_preferences` right-pads chosen/rejected pairs into one [2B, T] batch.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ernie_platform.data.pipeline import _format_of, _JsonlLines, _row_origin, packed_batch, resolve_files
from ernie_platform.data.records import IGNORE_INDEX, ON_ERROR, DataError, DataStats, origin, parse_row
from ernie_platform.posttrain.tasks import problems, wrong_answer

KINDS = ("sft", "dpo", "rl")
ROLES = ("system", "user", "assistant")


class TooLong(ValueError):
    """An example has more tokens than allowed (the caller counts and drops it)."""


# ---- normalized examples ---------------------------------------------------------------------------------------------
@dataclass
class SFTExample:
    messages: List[Dict[str, Any]]  # system?/user/assistant turns ending with an assistant turn


@dataclass
class PreferenceExample:
    messages: List[Dict[str, Any]]  # the prompt conversation, ending with a user turn
    chosen: str
    rejected: str


@dataclass
class RLExample:
    messages: List[Dict[str, Any]]  # the prompt conversation, ending with a user turn
    ground_truth: Any
    task: Optional[str] = None


# ---- field checks ----------------------------------------------------------------------------------------------------
def _fields(row: Mapping[str, Any]) -> List[str]:
    return sorted(row)[:12]


def _string(row: Mapping[str, Any], key: str, where: str, optional: bool = False) -> Optional[str]:
    value = row.get(key)
    if value is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r}; fields: {_fields(row)}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _strings(row: Mapping[str, Any], key: str, where: str) -> List[str]:
    """A field holding a string (one item) or a list of strings."""
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: missing field {key!r}; fields: {_fields(row)}")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a string or a list of strings")
    return list(value)


def _messages(value: Any, where: str, key: str, last_role: str) -> List[Dict[str, Any]]:
    """Validated chat messages [{"role", "content"}] (system only first) whose last turn has `last_role`."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role={role!r} (expected one of {ROLES})")
        if role == "system" and i > 0:
            raise DataError(f"{where}: {key}[{i}]: a system message may only come first")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != last_role:
        raise DataError(f"{where}: field {key!r} must end with a {last_role} message, got {out[-1]['role']!r}")
    return out


def _with_system(row: Mapping[str, Any], where: str, turns: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    system = _string(row, "system", where, optional=True)
    if system and not (turns and turns[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + turns
    return turns


def _turns(src: Sequence[str], tgt: Sequence[str]) -> List[Dict[str, Any]]:
    """Alternating user/assistant turns src[0], tgt[0], src[1], ... (src may have one more item: the prompt)."""
    out: List[Dict[str, Any]] = []
    for i, user in enumerate(src):
        out.append({"role": "user", "content": user})
        if i < len(tgt):
            out.append({"role": "assistant", "content": tgt[i]})
    return out


def _history(row: Mapping[str, Any], where: str, required: bool) -> Tuple[List[str], List[str]]:
    """ERNIEKit prompt fields: src (history users + the prompt) and tgt (history answers, len(src) - 1)."""
    src = _strings(row, "src", where)
    if not src:
        raise DataError(f"{where}: field 'src' is empty")
    if row.get("tgt") is None and not required:
        return src[-1:], []
    tgt = _strings(row, "tgt", where) if row.get("tgt") is not None else []
    if len(src) != len(tgt) + 1:
        raise DataError(f"{where}: fields 'src'/'tgt' need len(src) == len(tgt) + 1, got {len(src)} and {len(tgt)}")
    return src, tgt


# ---- parsers ---------------------------------------------------------------------------------------------------------
def parse_sft(row: Mapping[str, Any], where: str) -> SFTExample:
    """An SFT example from an ERNIEKit (src/tgt), alpaca (instruction/output) or chat (messages) record."""
    if "messages" in row:
        return SFTExample(_with_system(row, where, _messages(row["messages"], where, "messages", "assistant")))
    if "src" in row or "tgt" in row:
        src, tgt = _strings(row, "src", where), _strings(row, "tgt", where)
        if not src or len(src) != len(tgt):
            raise DataError(f"{where}: fields 'src'/'tgt' need the same non-zero length, got {len(src)}, {len(tgt)}")
        turns = _turns(src, tgt)
        label = row.get("label")
        if label is not None:
            if not isinstance(label, (list, tuple)) or len(label) != len(tgt) or any(v not in (0, 1) for v in label):
                raise DataError(f"{where}: field 'label' must be a list of 0/1 with one item per 'tgt' turn")
            for i, keep in enumerate(label):
                if not keep:
                    turns[2 * i + 1]["loss"] = False
        return SFTExample(_with_system(row, where, turns))
    if "instruction" in row or "output" in row:
        instruction, output = _string(row, "instruction", where), _string(row, "output", where)
        extra = _string(row, "input", where, optional=True)
        user = f"{instruction}\n{extra}" if extra else instruction
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return SFTExample(_with_system(row, where, turns))
    raise DataError(
        f"{where}: not an SFT record (expected 'src'+'tgt', 'instruction'+'output' or 'messages'); "
        f"fields: {_fields(row)}"
    )


def _response(value: Any, where: str, i: int) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise DataError(f"{where}: response[{i}] must be a string or a list of one string")
    return value


def parse_preference(row: Mapping[str, Any], where: str) -> PreferenceExample:
    """A preference pair from an ERNIEKit DPO (src/tgt/response/sort) or prompt/chosen/rejected record."""
    if "response" in row or "sort" in row:
        src, tgt = _history(row, where, required=True)
        responses, sort = row.get("response"), row.get("sort")
        if not isinstance(responses, (list, tuple)) or len(responses) != 2:
            raise DataError(f"{where}: field 'response' must be a list of 2 responses")
        ok = isinstance(sort, (list, tuple)) and len(sort) == 2
        if not ok or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in sort):
            raise DataError(f"{where}: field 'sort' must be a list of 2 numbers")
        if sort[0] == sort[1]:
            raise DataError(f"{where}: field 'sort' has equal values {list(sort)}: no preferred response")
        texts = [_response(r, where, i) for i, r in enumerate(responses)]
        best = 0 if sort[0] > sort[1] else 1
        return PreferenceExample(_with_system(row, where, _turns(src, tgt)), texts[best], texts[1 - best])
    if "chosen" in row or "rejected" in row:
        key = "prompt" if "prompt" in row else "question"
        prompt = row.get(key)
        if isinstance(prompt, (list, tuple)):
            turns = _messages(prompt, where, key, "user")
        else:
            turns = [{"role": "user", "content": _string(row, key, where)}]
        chosen, rejected = _string(row, "chosen", where), _string(row, "rejected", where)
        return PreferenceExample(_with_system(row, where, turns), chosen, rejected)
    raise DataError(
        f"{where}: not a preference record (expected 'src'+'tgt'+'response'+'sort' or "
        f"'prompt'|'question'+'chosen'+'rejected'); fields: {_fields(row)}"
    )


def parse_rl(row: Mapping[str, Any], where: str) -> RLExample:
    """An RL prompt with its ground truth from a plain, verl (reward_model.ground_truth) or src record."""
    if "reward_model" in row:
        reward = row["reward_model"]
        if not isinstance(reward, Mapping) or reward.get("ground_truth") is None:
            raise DataError(f"{where}: missing field 'reward_model.ground_truth'")
        truth = reward["ground_truth"]
    elif row.get("ground_truth") is not None:
        truth = row["ground_truth"]
    else:
        raise DataError(f"{where}: missing field 'ground_truth'; fields: {_fields(row)}")
    task = row.get("task", row.get("data_source"))
    if task is not None and not isinstance(task, str):
        raise DataError(f"{where}: field 'task' must be a string, got {type(task).__name__}")
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, (list, tuple)):
            turns = _messages(prompt, where, "prompt", "user")
        else:
            turns = [{"role": "user", "content": _string(row, "prompt", where)}]
    elif "src" in row:
        turns = _turns(*_history(row, where, required=False))
    else:
        raise DataError(f"{where}: missing field 'prompt' (or 'src'); fields: {_fields(row)}")
    return RLExample(_with_system(row, where, turns), truth, task)


PARSERS = {"sft": parse_sft, "dpo": parse_preference, "rl": parse_rl}


# ---- files -----------------------------------------------------------------------------------------------------------
def _rows(path: str, fmt: str) -> Iterator[Tuple[Dict[str, Any], str]]:
    """(row, "file:line") of one file: jsonl rows `{"path", "line", "raw"}` (1-based lines, blank lines skipped),
    parquet rows = the columns (1-based row numbers), as `read_dataset` gives them."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            if fmt == "jsonl":
                data = f.read()
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(f)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad source
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if fmt == "jsonl":
        for row in _JsonlLines({})({"path": path, "bytes": data}):
            yield row, origin(path, row["line"])
        return
    counters: Dict[str, int] = defaultdict(int)
    for row in table.to_pylist():
        row["path"] = path
        yield row, origin(*_row_origin(row, counters))


def read_examples(
    source: str, kind: str, on_error: str = "raise", fmt: str = "auto", stats: Optional[DataStats] = None
) -> List[Any]:
    """Every record of `source` (paths, directories, globs or fsspec URIs, comma separated; jsonl or parquet) parsed
    as `kind` ("sft" → SFTExample, "dpo" → PreferenceExample, "rl" → RLExample), in file order.

    Bad records (invalid JSON, bad fields) raise `DataError("file:line: ...")`, or with on_error="skip" are dropped
    and counted in `stats.skipped` (`stats.records` counts every row read). No usable record → DataError."""
    if kind not in PARSERS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    stats = stats if stats is not None else DataStats()
    parse = PARSERS[kind]
    files = resolve_files(source)
    fmt = _format_of(files, fmt)
    out: List[Any] = []
    for path in files:
        for row, where in _rows(path, fmt):
            stats.records += 1
            try:
                out.append(parse(parse_row(row, where), where))
            except DataError:
                if on_error == "raise":
                    raise
                stats.skipped += 1
    if not out:
        raise DataError(f"data source {source!r}: no usable {kind} records ({stats.skipped} skipped as bad)")
    return out


def builtin_examples(
    kind: str,
    split: str,
    n: int,
    seed: int,
    tasks: Sequence[str] = ("arithmetic",),
    options: Optional[Dict[str, Dict[str, Any]]] = None,
) -> List[Any]:
    """n examples of the built-in verifiable tasks (`tasks.problems`): sft → [user prompt, assistant answer];
    dpo → chosen = the answer, rejected = `wrong_answer`; rl → ground_truth = the answer, task = the task name."""
    if kind not in PARSERS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    probs = problems(list(tasks), split, n, seed, options)
    rng = random.Random(f"builtin_examples/{split}/{seed}")
    out: List[Any] = []
    for p in probs:
        user = [{"role": "user", "content": p.prompt}]
        if kind == "sft":
            out.append(SFTExample(user + [{"role": "assistant", "content": p.answer}]))
        elif kind == "dpo":
            out.append(PreferenceExample(user, p.answer, wrong_answer(p, rng)))
        else:
            out.append(RLExample(user, p.answer, p.task))
    return out


# ---- tokens ----------------------------------------------------------------------------------------------------------
def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _check_len(n: int, max_len: Optional[int], what: str) -> None:
    if max_len is not None and n > max_len:
        raise TooLong(f"{what} has {n} tokens > max_len={max_len}")


def _rest(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"the chat template does not render {what} as an extension of the previous turns")
    return text[len(prefix) :]


def chat_pieces(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> List[Tuple[str, bool]]:
    """The rendered conversation as (text, is_target) pieces whose concatenation is the full rendering. The target of
    assistant message i is render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True); an
    assistant message with `"loss": False` stays context."""
    pieces: List[Tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        pieces.append((_rest(prompt, done, f"message {i}'s prompt"), False))
        pieces.append((_rest(full, prompt, f"assistant message {i}"), m.get("loss", True) is not False))
        done = full
    pieces.append((_rest(_render(tokenizer, messages, False), done, "the last turns"), False))
    return [(text, target) for text, target in pieces if text]


def encode_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], max_len: Optional[int] = None
) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of a conversation: labels are the ids of each assistant turn's content and end-of-turn
    text (see `chat_pieces`), -100 elsewhere. Pieces are tokenized separately without special tokens, so the ids
    equal the tokenization of the full rendering for a concatenative tokenizer. `TooLong` past `max_len` tokens."""
    ids: List[int] = []
    labels: List[int] = []
    for text, target in chat_pieces(tokenizer, messages):
        tok = _ids(tokenizer, text)
        ids += tok
        labels += tok if target else [IGNORE_INDEX] * len(tok)
    _check_len(len(ids), max_len, "conversation")
    return ids, labels


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> List[int]:
    """Token ids of the prompt conversation followed by the generation prompt (e.g. "Assistant: ")."""
    return _ids(tokenizer, _render(tokenizer, messages, True))


def encode_preference(tokenizer: Any, ex: PreferenceExample, max_len: Optional[int] = None) -> Dict[str, Any]:
    """`{"chosen": (ids, labels), "rejected": (ids, labels), "prompt_len": int}`: both sequences share the prompt
    ids (`encode_prompt`); labels cover only the response and its end-of-turn text. `TooLong` past `max_len`."""
    prompt_text = _render(tokenizer, ex.messages, True)
    prompt = _ids(tokenizer, prompt_text)
    out: Dict[str, Any] = {"prompt_len": len(prompt)}
    for key, response in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        full = _render(tokenizer, list(ex.messages) + [{"role": "assistant", "content": response}], False)
        target = _ids(tokenizer, _rest(full, prompt_text, f"the {key} response"))
        _check_len(len(prompt) + len(target), max_len, f"{key} sequence")
        out[key] = (prompt + target, [IGNORE_INDEX] * len(prompt) + target)
    return out


# ---- batches ---------------------------------------------------------------------------------------------------------
def pack_sft(
    encoded: Iterable[Tuple[List[int], List[int]]],
    seq_len: int,
    micro_batch_size: int,
    pad_id: int = 0,
    drop_last: bool = False,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Greedy packing of whole (ids, labels) examples, in order, into rows of exactly `seq_len` tokens: an example
    that does not fit the current row starts the next one; a row's tail is padding (`pad_id`, label -100, its own
    segment). Yields `input_ids`, `labels`, `position_ids` [B, T] (positions restart at 0 for each example) and a
    block-diagonal causal `attention_mask` [B, 1, T, T] bool. Each example's first label is -100 (nothing before it
    in its segment predicts it). When `encoded` ends, the last batch is completed with all-padding rows (or dropped
    with `drop_last`). An example longer than seq_len → `TooLong`; empty examples are skipped."""
    if seq_len < 1 or micro_batch_size < 1:
        raise ValueError(f"need seq_len >= 1 and micro_batch_size >= 1, got {seq_len}, {micro_batch_size}")
    rows: List[Tuple[List[int], List[int], List[bool]]] = []
    ids: List[int] = []
    labels: List[int] = []
    starts: List[bool] = []

    def close_row() -> None:
        pad = seq_len - len(ids)
        pad_starts = [True] + [False] * (pad - 1) if pad else []
        rows.append((ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, starts + pad_starts))
        ids.clear()
        labels.clear()
        starts.clear()

    def batch() -> Dict[str, torch.Tensor]:
        chunk = rows[:micro_batch_size]
        del rows[:micro_batch_size]
        out = packed_batch(
            torch.tensor([r[0] for r in chunk], dtype=torch.long),
            torch.tensor([r[2] for r in chunk], dtype=torch.bool),
        )
        out["labels"] = torch.tensor([r[1] for r in chunk], dtype=torch.long)
        return out

    for k, (ex_ids, ex_labels) in enumerate(encoded):
        if len(ex_ids) != len(ex_labels):
            raise ValueError(f"example {k}: {len(ex_ids)} ids but {len(ex_labels)} labels")
        if not ex_ids:
            continue
        _check_len(len(ex_ids), seq_len, f"example {k}")
        if len(ids) + len(ex_ids) > seq_len:
            close_row()
            if len(rows) == micro_batch_size:
                yield batch()
        ids.extend(ex_ids)
        labels.extend([IGNORE_INDEX] + list(ex_labels[1:]))
        starts.extend([True] + [False] * (len(ex_ids) - 1))
    if ids:
        close_row()
    if rows and not drop_last:
        while len(rows) < micro_batch_size:
            close_row()  # all padding
        yield batch()


def collate_preferences(encoded_pairs: Sequence[Mapping[str, Any]], pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """One batch of B `encode_preference` pairs: `input_ids`, `labels`, `attention_mask` [2B, T] (rows 0..B-1
    chosen, B..2B-1 rejected; right padding with `pad_id`, label -100, mask 0; T = the longest sequence)."""
    if not encoded_pairs:
        raise ValueError("collate_preferences: no pairs")
    seqs = [p["chosen"] for p in encoded_pairs] + [p["rejected"] for p in encoded_pairs]
    t = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(lab, dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


__all__ = [
    "KINDS",
    "PreferenceExample",
    "RLExample",
    "SFTExample",
    "TooLong",
    "builtin_examples",
    "chat_pieces",
    "collate_preferences",
    "encode_chat",
    "encode_preference",
    "encode_prompt",
    "pack_sft",
    "parse_preference",
    "parse_rl",
    "parse_sft",
    "read_examples",
]
