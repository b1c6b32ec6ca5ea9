"""A built-in text corpus generated from templates with a seeded RNG.

Nothing is downloaded: the text is regular enough (facts, arithmetic, counting) that a small model's loss falls
visibly within a few dozen steps, which is what smoke runs and tests need.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch

_NAMES = ["Ada", "Bao", "Chen", "Dara", "Emil", "Fei", "Goro", "Hana", "Ivo", "Jun", "Kai", "Lin"]
_THINGS = ["apples", "books", "stones", "coins", "lamps", "shells", "maps", "kites", "cups", "seeds"]
_PLACES = ["the river", "the market", "the library", "the hill", "the harbor", "the garden", "the tower"]
_COLORS = ["red", "blue", "green", "gold", "white", "black", "silver"]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    name, thing, place = rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_PLACES)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"{a} plus {b} equals {a + b}."
    if kind == 1:
        n = rng.randrange(2, 9)
        return f"{name} counts {thing}: " + ", ".join(str(i) for i in range(1, n + 1)) + "."
    if kind == 2:
        return f"{name} walked to {place} and found {rng.randrange(2, 20)} {rng.choice(_COLORS)} {thing}."
    if kind == 3:
        return f"Question: where is {name}? Answer: {name} is at {place}."
    a = rng.randrange(2, 10)
    return f"{a} times {a} is {a * a}, and {a} times {a + 1} is {a * (a + 1)}."


def builtin_text_corpus(num_docs: int = 2000, seed: int = 0) -> list[str]:
    """`num_docs` short documents of 3–8 sentences each, identical for the same seed."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randrange(3, 9))) for _ in range(num_docs)]


def packed_token_batches(
    tokenizer, batch_size: int, seq_len: int, seed: int = 0, num_docs: int = 2000
) -> Iterator[torch.Tensor]:
    """Endless [batch_size, seq_len] LongTensors of documents joined by EOS and packed without padding."""
    stream: list[int] = []
    for doc in builtin_text_corpus(num_docs, seed):
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
        stream.append(tokenizer.eos_token_id)
    data = torch.tensor(stream, dtype=torch.long)
    n = data.numel() - seq_len - 1
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        yield torch.stack([data[s : s + seq_len] for s in starts.tolist()])
