"""Driver of the pretraining job: config → Ray → MLflow run → Ray Train `TorchTrainer` → export.

`run_pretraining(cfg)` is what `python -m workloads.pretrain` calls after Hydra composed and validated the config:

1. resolve the config to plain containers here in the driver (`${hydra:...}` and `${run.storage_path}` do not
   resolve inside Ray workers) and make `run.storage_path` absolute;
2. connect to Ray (`ernie_platform.runtime.connect_ray`): the cluster in `RAY_ADDRESS` (set by `ray job submit`) or
   a running local `ray start` cluster, else a new local instance; an address that does not answer fails fast;
3. open the MLflow run of `run.name` (`tracking.open_run`: created, or reopened by a rerun);
4. build the Ray Data dataset for file sources (every worker reads the full ordered stream and keeps its share, so
   the data position is exactly resumable: `ernie_platform.data.pipeline`);
5. run `TorchTrainer(train_loop_per_worker)` with `FailureConfig(max_failures)`, `CheckpointConfig(num_to_keep)`
   and `RunConfig(name=run.name, storage_path=...)` — the same name and storage path resume the latest checkpoint;
6. print a progress line while it runs and, at the end, where the export and the MLflow run are.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray
from omegaconf import DictConfig, OmegaConf

from ernie_platform.runtime import RayConnectionError, connect_ray
from ernie_platform.training.loop import export_dir, train_loop_per_worker
from ernie_platform.training.preflight import check_paths
from ernie_platform.training.stages import start_plan
from ernie_platform.training.tracking import close_run, default_tracking_uri, open_run

log = logging.getLogger(__name__)


def resolve(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Plain, fully resolved config with an absolute local `run.storage_path` (URIs are kept)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))
    storage = str(plain["run"]["storage_path"])
    if "://" not in storage:
        plain["run"]["storage_path"] = str(Path(storage).expanduser().resolve())
        stage = plain.get("stage") or {}
        if stage.get("init_from") and "://" not in stage["init_from"]:
            stage["init_from"] = str(Path(stage["init_from"]).expanduser().resolve())
    return plain


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(name: str, rec: dict[str, Any]) -> str:
    step, total = rec["step"], rec["max_steps"]
    phase = f" | {rec['phase']}" if rec.get("phase") not in (None, "all") else ""
    return (
        f"[{name}] step {step}/{total} ({100 * step / max(total, 1):.0f}%) | loss {rec['loss']:.4f} | "
        f"{rec['tokens_per_s']:,.0f} tok/s | ETA {_fmt_time(rec['eta_s'])}{phase}"
    )


def _root_cause(exc: BaseException) -> str:
    """The most specific message in a Ray Train failure (a worker's DataError / ValueError ...)."""
    text = str(exc)
    for marker in ("DataError:", "CheckpointError:", "ValueError:", "FileNotFoundError:", "RuntimeError:"):
        idx = text.rfind(marker)
        if idx >= 0:
            return text[idx:].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


def run_pretraining(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run the configured pretraining job to the end; returns run id, tracking URI, export path and final metrics."""
    plain = resolve(cfg)
    check_paths(plain)  # before Ray and the MLflow run: a wrong path fails here, naming its key
    return run_train_job(plain, train_loop_per_worker, start_plan(plain), ray_data=True)


def run_train_job(
    plain: dict[str, Any],
    train_loop: Callable[[dict[str, Any]], None],
    plan_line: str,
    ray_data: bool = False,
    extra_cpus: float = 0.0,
) -> dict[str, Any]:
    """The driver shared by pretraining and post-training: Ray, the MLflow run, `TorchTrainer(train_loop)` with
    fault tolerance and resume, the progress line and the summary. `plain` is a `resolve`d config; `ray_data`: read
    `data.source` files with Ray Data into the "train" dataset; `extra_cpus`: CPUs the loop's own actors need (RL
    rollout workers) when a local Ray instance is started."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t, run = plain["trainer"], plain["run"]
    name = run["name"]
    try:
        cpus = int(math.ceil(int(t["num_workers"]) * int(t["cpus_per_worker"]) + extra_cpus))
        where = connect_ray(cpus, dashboard=True)  # Ray Train's placement-group cleaner reads the State API
    except RayConnectionError as exc:
        # JobFailed is what the workloads' __main__ turn into exit status 1 without a traceback; the message is the fix.
        print(f"[{name}] {exc}", file=sys.stderr, flush=True)
        raise JobFailed(str(exc)) from exc
    print(f"[{name}] Ray: {where}; {t['num_workers']} workers; storage {run['storage_path']}", flush=True)
    print(f"[{name}] {plan_line}", flush=True)

    datasets = None
    if ray_data and plain["data"]["source"] != "builtin":
        from ernie_platform.data import read_dataset

        ray.data.DataContext.get_current().execution_options.preserve_order = True
        datasets = {"train": read_dataset(plain["data"])}

    tracking_uri = default_tracking_uri(run["storage_path"])
    run_id, reopened = open_run(plain, tracking_uri)
    print(f"[{name}] MLflow run {run_id} ({'reopened' if reopened else 'new'}) at {tracking_uri}", flush=True)

    progress = ProgressBoard.options(num_cpus=0).remote()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": plain, "tracking_uri": tracking_uri, "run_id": run_id, "progress": progress},
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(t["num_workers"]),
            use_gpu=bool(t["use_gpu"]),
            resources_per_worker={"CPU": int(t["cpus_per_worker"]), **({"GPU": 1} if t["use_gpu"] else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=run["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=int(t["max_failures"])),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(t["keep_checkpoints"])),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]) if datasets else None,
    )

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    started = time.time()
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    last = None
    while thread.is_alive():
        thread.join(timeout=2.0)
        try:
            rec = ray.get(progress.get.remote(), timeout=10)
        except Exception:
            rec = None
        if rec is not None and rec != last:
            print(progress_line(name, rec), flush=True)
            last = rec
    ray.kill(progress)

    if "error" in outcome:
        close_run(tracking_uri, run_id, "FAILED")
        cause = _root_cause(outcome["error"])
        print(f"[{name}] FAILED after {_fmt_time(time.time() - started)}: {cause}", file=sys.stderr, flush=True)
        raise JobFailed(cause) from outcome["error"]

    result = outcome["result"]
    export = export_dir(plain)
    close_run(tracking_uri, run_id, "FINISHED", {"ernie.export": export})
    metrics = dict(result.metrics or {})
    db = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
    lines = [
        f"[{name}] done in {_fmt_time(time.time() - started)}: step {int(metrics.get('step', 0))}, "
        f"loss {metrics.get('lm_loss', metrics.get('loss', float('nan'))):.4f}",
        f"  export:      {export}",
        f"  checkpoint:  {result.checkpoint.path if result.checkpoint else None}",
        f"  MLflow run:  {run_id} (experiment {run['experiment']!r}, tracking URI {tracking_uri})",
        f"  MLflow UI:   mlflow ui --backend-store-uri {tracking_uri}" + (f"  # database {db}" if db else ""),
    ]
    if "eval/answer_accuracy" in metrics:
        lines.insert(
            1,
            f"  held-out answer accuracy {metrics['eval/answer_accuracy']:.3f} "
            f"(chance {metrics.get('eval/chance_accuracy', float('nan')):.3f})",
        )
    elif any(k.startswith("eval/") for k in metrics):
        held_out = {k: v for k, v in sorted(metrics.items()) if k.startswith("eval/") and k.count("/") == 1}
        lines.insert(1, "  held-out " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in held_out.items()))
    print("\n".join(lines), flush=True)
    return {
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "export": export,
        "metrics": metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }


class JobFailed(RuntimeError):
    """The training job failed; the message is the root cause reported by the workers."""


@ray.remote
class ProgressBoard:
    """Latest progress record of rank 0 (fire-and-forget updates from the worker), polled by the driver."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def update(self, rec: dict[str, Any]) -> None:
        self.latest = rec

    def get(self) -> dict[str, Any] | None:
        return self.latest


__all__ = ["JobFailed", "progress_line", "resolve", "run_pretraining", "run_train_job"]
