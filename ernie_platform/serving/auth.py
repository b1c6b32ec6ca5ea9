"""The serving API key: where it comes from, and keeping it out of configs, logs and disk.

The key is read from the environment (`ERNIE_API_KEY`; a Kubernetes Secret sets it in the RayService manifests) or
from a file (`serve.api_key_file`, e.g. a mounted Secret). It is never a config value: Hydra writes the composed
config and the command-line overrides in plain text under `outputs/<date>/<time>/.hydra/` *before* the job runs, so
`serve.api_key=...` is refused on the command line (`reject_key_overrides`, before Hydra starts) and has no field in
the schema (a config file with it fails composition, which writes nothing). Error messages never echo the value.

The resolved key travels to the ingress replica as an init argument (in Ray's memory only), wrapped in `Secret`,
whose repr is masked so that a logged config or an exception cannot print it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

API_KEY_ENV = "ERNIE_API_KEY"
LEGACY_API_KEY_ENV = "ERNIE_SERVE_API_KEY"  # the name before issue #22; still read so an old deployment keeps its auth
KEY_REFUSED = (
    "serve.api_key is not accepted as a config value: Hydra would write it in plain text to "
    "outputs/.../.hydra/{config,overrides,hydra}.yaml. Give the key in the environment "
    f"({API_KEY_ENV}=... python -m workloads.serve ...) or in a file (serve.api_key_file=/path/to/key)."
)
# the key of an override (`serve.api_key=`, `+serve.api_key=`, `++api_key=`) or a key inside a dict value
# (`serve={api_key: x}`); `api_key_file` does not match
_OVERRIDE_KEY = re.compile(r"(?:^|[.~+/@])api_key$")
_DICT_KEY = re.compile(r"(?<![\w])['\"]?api_key['\"]?\s*:")


class Secret:
    """A string that does not show itself: `repr`/`str` are masked; `.get()` returns the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # pickled to the ingress replica (init argument)
        return (Secret, (self._value,))


class ApiKeyConfigError(ValueError):
    """`serve.api_key` given as a config value (the message never contains the value)."""


def key_overrides(overrides: Iterable[str]) -> list[str]:
    """The names of the overrides in `overrides` that would set an API key (values left out)."""
    found = []
    for item in overrides:
        if item.startswith("-"):  # a Hydra flag (--cfg, -m, ...), not an override
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if eq and (_OVERRIDE_KEY.search(key) or ("{" in value and _DICT_KEY.search(value))):
            found.append(key)
    return found


def reject_key_overrides(overrides: Iterable[str]) -> None:
    """Raise `ApiKeyConfigError` if a command-line override sets an API key (call before Hydra composes)."""
    found = key_overrides(overrides)
    if found:
        raise ApiKeyConfigError(f"{KEY_REFUSED} (refused override: {', '.join(found)}=<hidden>)")


def reject_key_mapping(args: Mapping[str, Any], prefix: str = "") -> None:
    """Raise `ApiKeyConfigError` if `args` (flat dotted keys or nested mappings, as `build_app` takes them) sets
    an API key: a Serve config file's `args:` is stored and shown by Ray's dashboard."""
    for k, v in args.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            reject_key_mapping(v, f"{key}.")
        elif _OVERRIDE_KEY.search(key):
            raise ApiKeyConfigError(f"{KEY_REFUSED} (refused: {key}=<hidden>)")


def read_key_file(path: str) -> Secret:
    """The key in `path`: its content without surrounding whitespace (a Secret volume's trailing newline)."""
    p = Path(path).expanduser()
    try:
        value = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config: serve.api_key_file={path!r} cannot be read ({type(e).__name__})") from None
    if not value:
        raise ValueError(f"config: serve.api_key_file={path!r} is empty")
    if any(c.isspace() for c in value):
        raise ValueError(f"config: serve.api_key_file={path!r}: the key must be one token without whitespace")
    return Secret(value)


def resolve_api_key(serve_cfg: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> Optional[Secret]:
    """The API key of `serve_cfg` (the plain `serve` node): `serve.api_key_file` if set, else `ERNIE_API_KEY` (or
    the legacy `ERNIE_SERVE_API_KEY`) from the environment, else None (no auth). A `api_key` entry is an error."""
    if "api_key" in serve_cfg:
        raise ApiKeyConfigError(KEY_REFUSED)
    env = os.environ if environ is None else environ
    path = serve_cfg.get("api_key_file")
    if path:
        return read_key_file(str(path))
    value = (env.get(API_KEY_ENV) or "").strip()
    if not value and (env.get(LEGACY_API_KEY_ENV) or "").strip():
        log.warning("serve: %s is deprecated; set %s instead", LEGACY_API_KEY_ENV, API_KEY_ENV)
        value = env[LEGACY_API_KEY_ENV].strip()
    return Secret(value) if value else None
