"""Fault-tolerant checkpoints of the pretraining loop: DeepSpeed's `save_checkpoint` inside Ray Train's
`ray.train.report`.

Layout of one checkpoint (Ray Train copies every rank's files into `run.storage_path/run.name/checkpoint_*/`)::

    ds/                       DeepSpeed: model states (rank 0), each rank's ZeRO optimizer shard, LR scheduler
    experts_rank{r}.pt        expert parallelism only: rank r's expert shards, their AdamW moments, the slot tables
    rng_rank{r}.json          RNG states of rank r (python, numpy, torch)
    state.json                step, data position (micro-batches consumed per rank), MLflow run id — rank 0

Why a checkpoint is never half-written as far as a resumed job is concerned: every rank writes into its own fresh
local directory and hands it to `ray.train.report`; Ray Train registers the checkpoint as the latest only after
all ranks have reported and their files are persisted, so a crash in the middle leaves the previous registered
checkpoint as the one `ray.train.get_checkpoint()` returns on restart. `state.json` is written after DeepSpeed's
files, and `load` refuses a checkpoint without it.

The DeepSpeed files are pickles written by this job (DeepSpeed's loader unpickles them); only resume from
checkpoint directories you wrote. Model weights shared with others travel as the safetensors export.
"""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

DS_TAG = "ds"
STATE_FILE = "state.json"


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(
    engine: Any,
    state: dict[str, Any],
    rank: int,
    metrics: dict[str, float],
    write_extra: Optional[Callable[[Path], None]] = None,
) -> None:
    """Collective: every rank saves its part with DeepSpeed (and `write_extra(dir)`: files of its own, e.g. its
    expert shards) and reports it to Ray Train with `metrics`."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"ernie-ckpt-r{rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        if write_extra is not None:
            write_extra(Path(tmp))
        (Path(tmp) / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load(
    engine: Any, checkpoint: Any, rank: int, read_extra: Optional[Callable[[Path], None]] = None
) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler), this rank's RNG and `read_extra(dir)` (after DeepSpeed's load);
    returns the loop state of rank 0's file."""
    with checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint {d} has no {STATE_FILE}: it is incomplete and cannot be resumed")
        state = json.loads((d / STATE_FILE).read_text())
        path, _ = engine.load_checkpoint(str(d), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {d}/{DS_TAG}")
        if read_extra is not None:
            read_extra(d)
        rng_file = d / f"rng_rank{rank}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
    return state


def maybe_inject_failure(trainer_cfg: dict[str, Any], run_dir: str, step: int, rank: int) -> None:
    """`trainer.fail_at_step`: the chosen rank SIGKILLs itself when it reaches that step, once per run (a marker
    file in the run directory remembers it), like a node losing a worker mid-run."""
    at = trainer_cfg.get("fail_at_step")
    if at is None or step != int(at) or rank != int(trainer_cfg.get("fail_rank", 0)):
        return
    marker = Path(run_dir) / f".failure_injected_at_{at}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("injected\n")
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["DS_TAG", "STATE_FILE", "load", "maybe_inject_failure", "rng_state", "save", "set_rng_state"]
