"""MLflow tracking of a training job: one MLflow run per `run.name`, created or reopened by the driver, written to
by rank 0 only.

* Tracking URI: `MLFLOW_TRACKING_URI` when set (a tracking server for clusters), else a SQLite database in the
  storage directory (`sqlite:///<run.storage_path>/mlflow.db`; MLflow 3 has no file store). Workers on other nodes
  need the environment variable: a SQLite file on the driver's disk is only reachable on one machine.
* The run is found by its tag `ernie.run_name` in the experiment `run.experiment`; a rerun with the same
  `run.name` (resume, or a larger `trainer.max_steps`) reopens it, so its curves continue in one run.
* Params: the resolved config flattened (`trainer.lr`, ...). MLflow params are immutable, so a rerun that changes a
  value records it as the tag `changed.<key>` instead; the resolved config of every attempt is also an artifact.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

RUN_NAME_TAG = "ernie.run_name"
MAX_PARAM_LEN = 6000


def default_tracking_uri(storage_path: str) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if "://" in storage_path and not storage_path.startswith("file://"):
        # Object-store storage: keep the database beside the driver.
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    local = Path(storage_path.removeprefix("file://")).expanduser().resolve()
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / 'mlflow.db'}"


def _artifact_root(storage_path: str) -> str:
    if "://" in storage_path and not storage_path.startswith("file://"):
        return f"{storage_path.rstrip('/')}/mlartifacts"
    return (Path(storage_path.removeprefix("file://")).expanduser().resolve() / "mlartifacts").as_uri()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:MAX_PARAM_LEN]
    return out


def open_run(cfg: Mapping[str, Any], tracking_uri: str) -> tuple[str, bool]:
    """(run id, reopened) of the MLflow run of `cfg['run']['name']`; logs params, tags and the config artifact."""
    import tempfile

    import yaml
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient(tracking_uri)
    run_cfg = cfg["run"]
    exp = client.get_experiment_by_name(run_cfg["experiment"])
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        # With the default SQLite store the artifacts live beside the database, not in ./mlruns of the cwd.
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else _artifact_root(run_cfg["storage_path"])
        exp_id = client.create_experiment(run_cfg["experiment"], artifact_location=location)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_cfg['name']}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    stage = (cfg.get("stage") or {}).get("name")
    if found:
        run_id, reopened = found[0].info.run_id, True
        client.update_run(run_id, status="RUNNING")
        existing = found[0].data.params
    else:
        tags = {RUN_NAME_TAG: run_cfg["name"], "ernie.stage": str(stage), "ernie.model": str(cfg["model"]["name"])}
        run = client.create_run(exp_id, run_name=run_cfg["name"], tags=tags)
        run_id, reopened, existing = run.info.run_id, False, {}
    params = flatten(cfg)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = [RunTag(f"changed.{k}", v) for k, v in params.items() if k in existing and existing[k] != v]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])
    if changed:
        client.log_batch(run_id, tags=changed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"resolved-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}.yaml"
        path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
        client.log_artifact(run_id, str(path), artifact_path="config")
    return run_id, reopened


def close_run(tracking_uri: str, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status=status)


class RankZeroLogger:
    """Metrics of the MLflow run from rank 0 of the job, with MLflow's system metrics (CPU, memory, GPU) sampled in
    this process while it lives."""

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool = True):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(
                    run_id,
                    sampling_interval=5,
                    samples_before_logging=1,
                    resume_logging=True,
                    tracking_uri=tracking_uri,
                )
                self._monitor.start()
            except Exception:  # system metrics are a nicety (psutil missing, ...): never fail training for them
                self._monitor = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def close(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass
            self._monitor = None


def metric_history(tracking_uri: str, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs per metric key, sorted by step (for tests and reports)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


__all__ = [
    "RUN_NAME_TAG",
    "RankZeroLogger",
    "close_run",
    "default_tracking_uri",
    "flatten",
    "metric_history",
    "open_run",
]
