"""Verifiable rewards: `reward(prompt, completion, ground_truth) -> float`, a registry, and safe scoring.

A reward is named by a spec string (`get_reward`): a registered name ("arithmetic"), a file and a function
("path/to/rewards.py:my_reward") or an importable module and a function ("my_pkg.rewards:my_reward"). `score` runs
one so that a bug in it (an exception, a NaN) costs one sample a fixed score and a message, not the training run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Union

RewardFn = Callable[[str, str, Any], float]
REWARDS: dict[str, RewardFn] = {}


class RewardError(RuntimeError):
    """A reward function failed on a sample (raised by `score(..., on_error="raise")`)."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward function under `name` (for `get_reward(name)`)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        existing = REWARDS.get(name)
        # The same function defined again (a module executed twice) may re-register; a different one may not.
        if existing is not None and _qualified_name(existing) != _qualified_name(fn):
            raise ValueError(f"reward {name!r} is already registered to {_qualified_name(existing)}")
        REWARDS[name] = fn
        return fn

    return decorator


def _qualified_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# ---- resolving a spec ------------------------------------------------------------------------------------------------
def get_reward(spec: str) -> RewardFn:
    """The reward named by `spec`: a registered name, `path/to/file.py:function` or `package.module:function`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}: registered rewards are {sorted(REWARDS)}; "
            "or give 'path/to/file.py:function' or 'package.module:function'"
        )
    # rpartition: a Windows drive letter ("C:\\r.py:fn") keeps its colon in the path.
    location, _, fn_name = spec.rpartition(":")
    if not location or not fn_name:
        raise ValueError(f"reward spec {spec!r} must look like 'path/to/file.py:function' or 'package.module:function'")
    is_file = location.endswith(".py") or "/" in location or "\\" in location
    module = _load_file(location, spec) if is_file else _import_module(location, spec)
    fn = getattr(module, fn_name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"reward spec {spec!r}: {location} has no function {fn_name!r} (it defines {public})")
    if not callable(fn):
        raise ValueError(f"reward spec {spec!r}: {location}:{fn_name} is a {type(fn).__name__}, not a function")
    return fn


def _load_file(location: str, spec: str) -> Any:
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        fn_name = spec.rpartition(":")[2]
        raise ValueError(f"reward spec {spec!r}: file {location} not found (looked for function {fn_name!r})")
    # A name unique per file, so two reward files both called rewards.py do not replace each other.
    module_name = f"_ernie_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward spec {spec!r}: cannot load {location} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # In sys.modules while it executes (dataclasses and typing look themselves up there), then removed again so
    # cloudpickle ships the function by value to Ray workers, which cannot import this synthetic module.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(module_name, None)
    return module


def _import_module(location: str, spec: str) -> Any:
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as e:
        raise ValueError(
            f"reward spec {spec!r}: cannot import module {location!r} ({e}); looked for function "
            f"{spec.rpartition(':')[2]!r}"
        ) from e


# ---- built-in rewards ------------------------------------------------------------------------------------------------
# A number: optional sign, digits with optional thousands separators ("1,234"), optional decimals. A '-' is a sign
# only when it does not follow a digit, letter, '.' or another '-', so "10-3" reads as 10 and 3 and "--5" as 5.
# Exponents are not parsed ("1e5" reads as 1 and 5).
_NUMBER_RE = re.compile(r"(?:(?<![0-9A-Za-z_.\-])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?")
_INTEGER_RE = re.compile(r"-?[0-9]+")


def last_number(text: str) -> Optional[str]:
    """The last number in `text` with thousands separators removed ("-1234.5"), or None if there is none."""
    matches = _NUMBER_RE.findall(text)
    return matches[-1].replace(",", "") if matches else None


def _as_fraction(value: Any) -> Fraction:
    """`value` (int, float or numeric string) as an exact Fraction, so large integers compare exactly."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"ground_truth must be a number or a numeric string, got {value!r}")
    text = repr(value) if isinstance(value, float) else str(value)
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"ground_truth must be a number or a numeric string, got {value!r}") from e


@register_reward("exact_match")
def exact_match(prompt: str, completion: str, ground_truth: Any) -> float:
    """1.0 if the completion equals the ground truth, surrounding whitespace ignored; else 0.0."""
    if ground_truth is None:
        raise ValueError("exact_match needs a ground_truth, got None")
    return 1.0 if completion.strip() == str(ground_truth).strip() else 0.0


@register_reward("math_answer")
def math_answer(prompt: str, completion: str, ground_truth: Any) -> float:
    """1.0 if the last number in the completion equals the ground truth numerically ("1,234.0" == 1234); else 0.0,
    also when the completion has no number."""
    expected = _as_fraction(ground_truth)
    found = last_number(completion)
    return 1.0 if found is not None and Fraction(found) == expected else 0.0


@register_reward("answer_format")
def answer_format(prompt: str, completion: str, ground_truth: Any) -> float:
    """1.0 if the stripped completion is exactly one integer (ASCII digits, optional leading '-'); else 0.0."""
    return 1.0 if _INTEGER_RE.fullmatch(completion.strip()) else 0.0


@register_reward("arithmetic")
def arithmetic(prompt: str, completion: str, ground_truth: Any) -> float:
    """The built-in tasks' reward: 1.0 for the exact answer, 0.1 for a well-formed but wrong integer, else 0.0.

    The 0.1 gives a group of all-wrong samples a learning signal towards the answer format."""
    if exact_match(prompt, completion, ground_truth):
        return 1.0
    return 0.1 if answer_format(prompt, completion, ground_truth) else 0.0


@register_reward("count_exact")
def count_exact(prompt: str, completion: str, ground_truth: Any) -> float:
    """The counting tasks' reward; the same rule as `arithmetic`."""
    return arithmetic(prompt, completion, ground_truth)


# ---- scoring ---------------------------------------------------------------------------------------------------------
def _preview(text: Any) -> str:
    return repr(text[:80]) if isinstance(text, str) else repr(text)[:80]


def _as_finite_float(value: Any) -> float:
    """`value` as a float, raising TypeError/ValueError unless it is a finite real number (bool is 0/1)."""
    if isinstance(value, (str, bytes)) or not (isinstance(value, numbers.Real) or hasattr(value, "__float__")):
        raise TypeError(f"returned {value!r} of type {type(value).__name__}, expected a finite real number")
    try:
        out = float(value)  # also a 1-element tensor or numpy scalar
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"returned {value!r} of type {type(value).__name__}, expected a finite real number") from e
    if not math.isfinite(out):
        raise ValueError(f"returned {out}, expected a finite real number")
    return out


def score(
    fn: RewardFn, prompt: str, completion: str, ground_truth: Any, on_error: Union[float, str] = 0.0
) -> tuple[float, Optional[str]]:
    """(reward, None) for a sample, or (`on_error`, message) when `fn` raises or returns something that is not a
    finite real number; with `on_error="raise"` a RewardError with the message is raised instead."""
    if on_error != "raise":
        if isinstance(on_error, (str, bool)) or not isinstance(on_error, numbers.Real) or not math.isfinite(on_error):
            raise ValueError(f"on_error must be a finite number or 'raise', got {on_error!r}")
    try:
        return _as_finite_float(fn(prompt, completion, ground_truth)), None
    except Exception as e:
        name = getattr(fn, "__name__", None) or repr(fn)
        message = (
            f"reward function {name} failed on sample prompt={_preview(prompt)} completion={_preview(completion)}: "
            f"{type(e).__name__}: {e}"
        )
        if on_error == "raise":
            raise RewardError(message) from e
        return float(on_error), message
