"""Checks the drivers run on a resolved config before Ray starts and before the MLflow run is opened.

A path that cannot work (`model.path=/no/such/dir`, a `data.source` file that is not there) would otherwise start
Ray, open (or reopen) the MLflow run, fail inside every Ray Train worker, be retried `trainer.max_failures` times and
leave a FAILED run behind; here it fails at once with the config key and value that are wrong. Only local paths are
checked: URIs (`s3://...`) are left to the workers, which have the credentials.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Union

from ernie_platform.data.pipeline import resolve_files
from ernie_platform.models.checkpoint import CheckpointError, weight_files


class ConfigPathError(FileNotFoundError):
    """A path in the config does not point at what its key needs; the message starts with `key=value:`."""


def _is_uri(path: str) -> bool:
    return "://" in path


def check_checkpoint_dir(key: str, path: Union[str, os.PathLike]) -> Path:
    """`path` (the value of config key `key`) is a local checkpoint directory: it exists and holds config.json and
    the safetensors files (all shards of its index). No tensor is read. Returns it as a `Path`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigPathError(f"{key}={path}: no config.json there (no such directory)")
    if not p.is_dir():
        raise ConfigPathError(f"{key}={path}: a file, not a checkpoint directory")
    if not (p / "config.json").is_file():
        raise ConfigPathError(f"{key}={path}: no config.json there (not a checkpoint directory)")
    try:
        weight_files(p)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigPathError(f"{key}={path}: {e}") from None
    return p


def check_data_source(key: str, source: Any) -> None:
    """Every local part of a comma-separated data source (`builtin`, paths, directories, globs, URIs) names files;
    URI parts are left to the readers."""
    text = str(source or "").strip()
    if text in ("", "builtin"):
        return
    local = [s.strip() for s in text.split(",") if s.strip() and not _is_uri(s.strip())]
    if local:
        try:
            resolve_files(",".join(local))
        except ValueError as e:  # DataError: "data.source '<part>' does not exist" / "... matches no ... files"
            raise ConfigPathError(f"{key}={source}: {str(e).removeprefix('data.source ')}") from None


def check_paths(cfg: Mapping[str, Any]) -> None:
    """The local paths of a resolved config (plain containers) that the job will read, checked before Ray starts.

    * `model.path`: a checkpoint directory when set;
    * `stage.init_from`: when it exists it must be a checkpoint directory (a stage whose previous export is absent
      trains from scratch by design, `training.stages`; one that points at something else is a mistake);
    * `data.source`, and post-training's `algo.eval_source` (and UPO's `algo.upo_pair_source`): files that exist.
    """
    model_path = (cfg.get("model") or {}).get("path")
    if model_path and not _is_uri(str(model_path)):
        check_checkpoint_dir("model.path", model_path)
    init_from = (cfg.get("stage") or {}).get("init_from")
    if init_from and not _is_uri(str(init_from)) and Path(init_from).expanduser().exists():
        check_checkpoint_dir("stage.init_from", init_from)
    check_data_source("data.source", (cfg.get("data") or {}).get("source"))
    algo = cfg.get("algo") or {}
    if algo.get("name"):
        check_data_source("algo.eval_source", algo.get("eval_source"))
    if algo.get("name") == "upo":  # the only algorithm that reads it
        check_data_source("algo.upo_pair_source", algo.get("upo_pair_source"))


__all__ = ["ConfigPathError", "check_checkpoint_dir", "check_data_source", "check_paths"]
