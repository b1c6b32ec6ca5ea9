"""Learning-rate schedules and stage phases (which parameter groups learn at which step).

Both are pure functions of the step, so a resumed run (or a LambdaLR rebuilt from a checkpoint) reproduces them.

* cosine: linear warm-up to `lr`, then cosine decay to `lr * min_ratio` at `max_steps`.
* wsd (warm-up, stable, decay — MiniCPM's schedule, used for long pretraining runs that are extended): linear
  warm-up, constant `lr`, then a linear decay to `lr * min_ratio` over the last `decay_fraction` of the steps.
* phases: a stage's `phases` split `max_steps` into consecutive windows (`fraction` of the steps each); inside a
  window only the listed parameter groups learn. A frozen group keeps its weights exactly: its optimizer group's
  learning rate is 0, so AdamW applies neither an update nor weight decay to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

PARAM_GROUPS = ("text", "vision", "resampler", "vision_experts")


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_ratio` at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def wsd_lr_at(step: int, max_steps: int, lr: float, warmup: int, min_ratio: float, decay_fraction: float) -> float:
    """Warm-up, stable at `lr`, then linear decay to `lr * min_ratio` over the last `decay_fraction` of the steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = max(1, round(max_steps * decay_fraction)) if decay_fraction > 0 else 0
    decay_start = max_steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return lr * (1 - (1 - min_ratio) * progress)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def schedule_fn(trainer_cfg: Any) -> Callable[[int], float]:
    """step -> learning rate of `trainer_cfg` (TrainerConfig, DictConfig or mapping)."""
    kind = _get(trainer_cfg, "lr_schedule", "cosine")
    lr = float(_get(trainer_cfg, "lr"))
    max_steps = int(_get(trainer_cfg, "max_steps"))
    warmup = max(1, int(_get(trainer_cfg, "warmup_steps", 0)))
    min_ratio = float(_get(trainer_cfg, "min_lr_ratio", 0.0))
    if kind == "cosine":
        return lambda step: lr_at(step, max_steps, lr, warmup, min_ratio)
    if kind == "wsd":
        frac = float(_get(trainer_cfg, "decay_fraction", 0.2))
        return lambda step: wsd_lr_at(step, max_steps, lr, warmup, min_ratio, frac)
    raise ValueError(f"trainer.lr_schedule={kind!r} is not valid (expected cosine or wsd)")


def phase_windows(phases: Sequence[Any], max_steps: int) -> list[tuple[str, int, int, frozenset[str]]]:
    """(name, first step, end step, groups that learn) per phase; steps after the last window train everything.

    `train: [all]` expands to every group. Window ends are rounded so that consecutive windows tile the steps."""
    out, start, acc = [], 0, 0.0
    for p in phases:
        acc += float(_get(p, "fraction", 1.0))
        end = min(max_steps, round(acc * max_steps))
        train = list(_get(p, "train", ["all"]))
        groups = frozenset(PARAM_GROUPS) if "all" in train else frozenset(train)
        out.append((str(_get(p, "name", f"phase{len(out)}")), start, end, groups))
        start = end
    if start < max_steps:
        out.append(("all" if not out else "rest", start, max_steps, frozenset(PARAM_GROUPS)))
    return out


def phase_at(windows: Sequence[tuple[str, int, int, frozenset[str]]], step: int) -> tuple[str, frozenset[str]]:
    """The phase name and learning groups at `step` (the last window past the end)."""
    for name, start, end, groups in windows:
        if start <= step < end:
            return name, groups
    if windows:
        return windows[-1][0], windows[-1][3]
    return "all", frozenset(PARAM_GROUPS)


class GroupLRFactor:
    """Picklable LambdaLR factor for one optimizer group: scale * schedule(step) / lr, or 0 while the group is frozen.

    Only plain data lives in `__dict__`: LambdaLR.state_dict() saves a callable object's `__dict__`, and DeepSpeed
    checkpoints that state."""

    def __init__(
        self, trainer_cfg: Mapping[str, Any], phases: Sequence[Mapping[str, Any]], group: str, scale: float = 1.0
    ):
        self.trainer_cfg = dict(trainer_cfg)
        self.phases = [{**p, "train": list(p.get("train", ["all"]))} for p in phases]
        self.group = group
        self.scale = float(scale)

    def __call__(self, step: int) -> float:
        lr = float(self.trainer_cfg["lr"])
        if lr <= 0:
            return 0.0
        _, groups = phase_at(phase_windows(self.phases, int(self.trainer_cfg["max_steps"])), step)
        return self.scale * schedule_fn(self.trainer_cfg)(step) / lr if self.group in groups else 0.0


__all__ = [
    "GroupLRFactor",
    "PARAM_GROUPS",
    "lr_at",
    "phase_at",
    "phase_windows",
    "schedule_fn",
    "wsd_lr_at",
]
