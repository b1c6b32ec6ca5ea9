"""Built-in verifiable tasks for post-training demos and evaluation (generated, no download, deterministic by seed).

* arithmetic: "What is 37+45?" → "82", "What is 82-45?" → "37" (subtraction never goes negative; the two operations
  are mixed 50/50).
* counting: "How many times does the letter 'a' appear in 'banana'?" → "3" over random strings of 3–10 letters a–e.

Train/test disjointness: every problem (arithmetic: the (a, op, b) triple; counting: the (letter, string) pair) is
assigned to "train" or "test" (about `test_percent`%, default `TEST_PERCENT`) by a stable hash of its key, so a
held-out score never measures a problem seen in training, whatever the seeds. The test sets are nested: a problem in
the test split at p% is in it at every larger p. Within a split, problems are drawn with `random.Random` seeded from
(task, split, seed): the same arguments give the same list. `distinct=True` (held-out evaluation) never repeats a
problem: arithmetic then samples its split's problems without replacement (both operations pooled, so at most the
whole split), and returns fewer than n when the split is smaller.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

SPLITS = ("train", "test")
TEST_PERCENT = 10
COUNT_LETTERS = "abcde"
COUNT_MIN_LEN, COUNT_MAX_LEN = 3, 10


@dataclass
class Problem:
    prompt: str
    answer: str
    task: str


def split_of(key: str, test_percent: int = TEST_PERCENT) -> str:
    """The split of a problem key: "test" for about test_percent% of keys, else "train" (stable across processes
    and Python versions)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 100 < test_percent else "train"


def _check(split: str, n: int, test_percent: int = TEST_PERCENT) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= test_percent <= 99:
        raise ValueError(f"test_percent must be in [1, 99], got {test_percent}")


def _draw(pool: Sequence, k: int, rng: random.Random) -> List:
    """k items of `pool`: without replacement when the pool is large enough, else with replacement."""
    if k <= len(pool):
        return rng.sample(list(pool), k)
    return [rng.choice(pool) for _ in range(k)]


# ---- arithmetic ------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _arithmetic_pools(
    max_operand: int, test_percent: int = TEST_PERCENT
) -> Dict[Tuple[str, str], Tuple[Tuple[int, str, int], ...]]:
    """(split, op) → the triples of that split, in a fixed order."""
    pools: Dict[Tuple[str, str], List[Tuple[int, str, int]]] = {(s, op): [] for s in SPLITS for op in "+-"}
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            pools[(split_of(f"arithmetic/{a}+{b}", test_percent), "+")].append((a, "+", b))
            if a >= b:
                pools[(split_of(f"arithmetic/{a}-{b}", test_percent), "-")].append((a, "-", b))
    return {k: tuple(v) for k, v in pools.items()}


def _arithmetic_problem(a: int, op: str, b: int) -> Problem:
    return Problem(f"What is {a}{op}{b}?", str(a + b if op == "+" else a - b), "arithmetic")


def arithmetic(
    split: str,
    n: int,
    seed: int,
    max_operand: int = 99,
    test_percent: int = TEST_PERCENT,
    distinct: bool = False,
) -> List[Problem]:
    """n addition/subtraction problems (50/50) with operands in [0, max_operand] from `split`'s problems;
    `distinct`: min(n, split size) different problems, sampled without replacement from both operations pooled
    (so the operations come in the split's proportion, about 2:1 additions)."""
    _check(split, n, test_percent)
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    pools = _arithmetic_pools(int(max_operand), int(test_percent))
    if distinct:
        pool = pools[(split, "+")] + pools[(split, "-")]
        rng = random.Random(f"arithmetic/{split}/{seed}/{max_operand}/{test_percent}/distinct")
        return [_arithmetic_problem(*t) for t in rng.sample(pool, min(n, len(pool)))]
    tag = "" if test_percent == TEST_PERCENT else f"/{test_percent}"
    rng = random.Random(f"arithmetic/{split}/{seed}/{max_operand}{tag}")
    ops = ["+" if rng.random() < 0.5 else "-" for _ in range(n)]
    drawn = {op: iter(_draw(pools[(split, op)], ops.count(op), rng)) for op in "+-"}
    return [_arithmetic_problem(*next(drawn[op])) for op in ops]


# ---- counting --------------------------------------------------------------------------------------------------------
def counting(split: str, n: int, seed: int, test_percent: int = TEST_PERCENT, distinct: bool = False) -> List[Problem]:
    """n letter-counting problems over random strings of COUNT_MIN_LEN..COUNT_MAX_LEN letters from COUNT_LETTERS;
    `distinct`: never a duplicate (the space is ~10^7 problems; gives up after 50·(n+1) draws)."""
    _check(split, n, test_percent)
    tag = "" if test_percent == TEST_PERCENT else f"/{test_percent}"
    rng = random.Random(f"counting/{split}/{seed}{tag}")
    seen = set()
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if distinct and attempts > 50 * (n + 1):
            break
        length = rng.randint(COUNT_MIN_LEN, COUNT_MAX_LEN)
        word = "".join(rng.choice(COUNT_LETTERS) for _ in range(length))
        letter = rng.choice(COUNT_LETTERS)
        key = f"counting/{letter}/{word}"
        if split_of(key, test_percent) != split:
            continue
        if key in seen and (distinct or attempts < 50 * (n + 1)):  # duplicates only once the split looks exhausted
            continue
        seen.add(key)
        prompt = f"How many times does the letter '{letter}' appear in '{word}'?"
        out.append(Problem(prompt, str(word.count(letter)), "counting"))
    return out


# ---- mixing ----------------------------------------------------------------------------------------------------------
TASKS: Dict[str, Callable[..., List[Problem]]] = {"arithmetic": arithmetic, "counting": counting}


def problems(
    tasks: Sequence[str], split: str, n: int, seed: int, options: Optional[Dict[str, Dict[str, Any]]] = None
) -> List[Problem]:
    """n problems mixing `tasks` evenly (the first n % len(tasks) tasks get one more), shuffled by seed;
    `options[task]`: keyword arguments of that task's generator (e.g. {"arithmetic": {"max_operand": 20}})."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("problems: no tasks given")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    _check(split, n)
    out: List[Problem] = []
    k = len(tasks)
    for i, name in enumerate(tasks):
        out.extend(TASKS[name](split, n // k + (1 if i < n % k else 0), seed, **(options or {}).get(name, {})))
    random.Random(f"problems/{split}/{seed}/{'/'.join(tasks)}").shuffle(out)
    return out


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer to an integer-answer problem: off by ±1 or ±10, or the last two digits swapped;
    never the right answer and never negative."""
    try:
        right = int(problem.answer)
    except ValueError:
        raise ValueError(f"wrong_answer needs an integer answer, got {problem.answer!r}") from None
    candidates = {right + 1, right - 1, right + 10, right - 10}
    digits = str(abs(right))
    if len(digits) >= 2:
        candidates.add(int(digits[:-2] + digits[-1] + digits[-2]))
    return str(rng.choice(sorted(c for c in candidates if c >= 0 and c != right)))


__all__ = ["Problem", "SPLITS", "TASKS", "arithmetic", "counting", "problems", "split_of", "wrong_answer"]
