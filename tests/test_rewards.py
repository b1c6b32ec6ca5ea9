"""Verifiable rewards: built-ins on malformed completions, spec resolution and error-tolerant scoring."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from ernie_platform.posttrain.rewards import (
    REWARDS,
    RewardError,
    answer_format,
    arithmetic,
    count_exact,
    exact_match,
    get_reward,
    last_number,
    math_answer,
    register_reward,
    score,
)

P = "What is 2 + 3?"


def test_builtins_are_registered() -> None:
    for name in ("exact_match", "math_answer", "answer_format", "arithmetic", "count_exact"):
        assert get_reward(name) is REWARDS[name]
    assert get_reward("arithmetic") is arithmetic


@pytest.mark.parametrize(
    "completion, truth, expected",
    [
        ("5", 5, 1.0),
        ("  5\n", "5 ", 1.0),
        ("5.0", 5, 0.0),  # exact text, not numeric
        ("", 5, 0.0),
        ("   ", "", 1.0),
        ("٥", 5, 0.0),  # Arabic-Indic five
        ("The answer is 5", 5, 0.0),
    ],
)
def test_exact_match(completion: str, truth: object, expected: float) -> None:
    assert exact_match(P, completion, truth) == expected


@pytest.mark.parametrize(
    "completion, truth, expected",
    [
        ("The answer is 5.", 5, 1.0),
        ("2 + 3 = 5", "5", 1.0),
        ("first 7, then 5", 5.0, 1.0),  # the LAST number counts
        ("5 apples, actually 6", 5, 0.0),
        ("It is -12 degrees", -12, 1.0),
        ("x=-3", -3, 1.0),
        ("10-3", 3, 1.0),  # a minus after a digit is an operator, not a sign
        ("--5", 5, 1.0),  # "--5" is not a valid negative number; its number is 5
        ("--5", -5, 0.0),
        ("total: 1,234,567 units", 1234567, 1.0),
        ("total: 1,234", "1,234", 1.0),
        ("12,34", 34, 1.0),  # not a thousands separator: two numbers
        ("pi is about 3.14", 3.14, 1.0),
        ("pi is about 3.14", "3.140", 1.0),
        ("0.1 + 0.2 = 0.3", 0.3, 1.0),  # compared exactly as decimals, no float rounding
        ("1e5", 100000, 0.0),  # no exponents: the numbers are 1 and 5
        ("1e5", 5, 1.0),
        ("", 5, 0.0),
        ("   \n\t", 0, 0.0),
        ("five", 5, 0.0),
        ("答案是 ٥", 5, 0.0),  # only ASCII digits are numbers
        ("答案是 42。", 42, 1.0),
        ("big: 123456789012345678901", 123456789012345678901, 1.0),  # beyond float precision
        ("big: 123456789012345678900", 123456789012345678901, 0.0),
        ("x" * 100_000 + " 7", 7, 1.0),
    ],
)
def test_math_answer(completion: str, truth: object, expected: float) -> None:
    assert math_answer(P, completion, truth) == expected


def test_last_number() -> None:
    assert last_number("a -1,000.5 b") == "-1000.5"
    assert last_number("no digits") is None


def test_math_answer_bad_ground_truth() -> None:
    with pytest.raises(ValueError, match="ground_truth must be a number or a numeric string, got None"):
        math_answer(P, "5", None)
    with pytest.raises(ValueError, match="got 'five'"):
        math_answer(P, "5", "five")
    with pytest.raises(ValueError, match="exact_match needs a ground_truth, got None"):
        exact_match(P, "None", None)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("5", 1.0),
        (" -42\n", 1.0),
        ("007", 1.0),
        ("--5", 0.0),
        ("+5", 0.0),
        ("5.0", 0.0),
        ("1e5", 0.0),
        ("1,000", 0.0),
        ("5 apples", 0.0),
        ("", 0.0),
        ("-", 0.0),
        ("٥", 0.0),
        ("1" * 10_000, 1.0),
    ],
)
def test_answer_format(completion: str, expected: float) -> None:
    assert answer_format(P, completion, None) == expected


@pytest.mark.parametrize("fn", [arithmetic, count_exact])
def test_arithmetic_and_count_rewards(fn) -> None:
    assert fn(P, " 5 ", 5) == 1.0
    assert fn(P, "6", 5) == 0.1  # well-formed but wrong
    assert fn(P, "-5", 5) == 0.1
    assert fn(P, "5 is the answer", 5) == 0.0
    assert fn(P, "", 5) == 0.0
    assert fn(P, "٥", 5) == 0.0


# ---- resolving specs -------------------------------------------------------------------------------------------------
def test_get_reward_from_file(tmp_path: Path) -> None:
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass Cfg:\n    bonus: float = 0.5\n\n"
        "def length_bonus(prompt, completion, ground_truth):\n"
        "    return Cfg().bonus if len(completion) < ground_truth else 0.0\n"
    )
    fn = get_reward(f"{path}:length_bonus")
    assert fn(P, "abc", 5) == 0.5 and fn(P, "abcdef", 5) == 0.0
    assert fn.__module__ not in sys.modules  # so cloudpickle ships it by value
    with pytest.raises(ValueError, match=r"my_rewards.py has no function 'nope' \(it defines \['Cfg', 'dataclass', "):
        get_reward(f"{path}:nope")
    with pytest.raises(ValueError, match=r"file .*missing.py not found \(looked for function 'length_bonus'\)"):
        get_reward(f"{tmp_path / 'missing.py'}:length_bonus")


def test_get_reward_from_module() -> None:
    assert get_reward("ernie_platform.posttrain.rewards:math_answer") is math_answer
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_pkg.rewards'.*function 'fn'"):
        get_reward("no_such_pkg.rewards:fn")
    with pytest.raises(ValueError, match=r"ernie_platform.posttrain.rewards has no function 'missing'"):
        get_reward("ernie_platform.posttrain.rewards:missing")
    with pytest.raises(ValueError, match="ernie_platform.posttrain.rewards:REWARDS is a dict, not a function"):
        get_reward("ernie_platform.posttrain.rewards:REWARDS")


def test_get_reward_unknown_name_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'nope': registered rewards are \['answer_format', 'arith"):
        get_reward("nope")
    with pytest.raises(ValueError, match="reward spec must be a non-empty string"):
        get_reward("")


def test_register_reward() -> None:
    @register_reward("test_always_one")
    def always_one(prompt: str, completion: str, ground_truth: object) -> float:
        return 1.0

    try:
        assert get_reward("test_always_one") is always_one
        with pytest.raises(ValueError, match="reward 'test_always_one' is already registered"):
            register_reward("test_always_one")(lambda p, c, g: 0.0)
    finally:
        del REWARDS["test_always_one"]
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("a:b")


# ---- scoring ---------------------------------------------------------------------------------------------------------
def broken_reward(prompt: str, completion: str, ground_truth: object) -> float:
    raise KeyError("answer")


def test_score_ok_and_number_types() -> None:
    assert score(math_answer, P, "5", 5) == (1.0, None)
    assert score(lambda p, c, g: True, P, "", None) == (1.0, None)
    assert score(lambda p, c, g: 3, P, "", None) == (3.0, None)


def test_score_raising_reward() -> None:
    long_prompt = "p" * 200
    value, message = score(broken_reward, long_prompt, "ünïcode ✓", 5, on_error=-1.0)
    assert value == -1.0
    assert message == (
        f"reward function broken_reward failed on sample prompt={'p' * 80!r} completion='ünïcode ✓': KeyError: 'answer'"
    )
    assert score(broken_reward, P, "", 5) == (
        0.0,
        "reward function broken_reward failed on sample prompt='What is 2 + 3?' completion='': KeyError: 'answer'",
    )
    with pytest.raises(RewardError, match=r"reward function broken_reward failed .* KeyError: 'answer'") as info:
        score(broken_reward, P, "", 5, on_error="raise")
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    "returned, error",
    [
        (math.nan, "ValueError: returned nan, expected a finite real number"),
        (math.inf, "ValueError: returned inf, expected a finite real number"),
        (None, "TypeError: returned None of type NoneType, expected a finite real number"),
        ("1.0", "TypeError: returned '1.0' of type str, expected a finite real number"),
        (1 + 2j, "TypeError: returned (1+2j) of type complex, expected a finite real number"),
    ],
)
def test_score_non_finite_or_non_numeric(returned: object, error: str) -> None:
    value, message = score(lambda p, c, g: returned, P, "5", 5, on_error=0.25)
    assert value == 0.25 and message.endswith(error)
    with pytest.raises(RewardError, match="failed on sample"):
        score(lambda p, c, g: returned, P, "5", 5, on_error="raise")


def test_score_reward_on_none_ground_truth() -> None:
    value, message = score(math_answer, P, "5", None)
    assert value == 0.0 and "ValueError: ground_truth must be a number" in message


def test_score_bad_on_error() -> None:
    for bad in ("skip", math.nan, None):
        with pytest.raises(ValueError, match="on_error must be a finite number or 'raise'"):
            score(math_answer, P, "5", 5, on_error=bad)
