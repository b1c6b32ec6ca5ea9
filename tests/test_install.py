"""The install: the names the project installs are its own, and what is installed is what the lock says.

transformers 5.25 started to depend on Hugging Face's `kernels` package while this project shipped a top-level
`kernels/` of its own; every fresh install broke (from the repository root transformers imported ours, from
anywhere else ours resolved to theirs). These tests fail if a top-level name collides again, and if the test
environment was not installed from requirements/lock-cpu.txt (so a green run means the locked versions work).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-cpu.txt"
# The top-level import names this project installs (pyproject.toml [tool.setuptools.packages.find]).
OWN_TOP_LEVEL = {"ernie_platform", "workloads"}


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # A fresh interpreter: `python -c` puts the working directory first on sys.path, as a user's shell would.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_hugging_face_kernels_is_installed():
    # Without it the two collision tests below would pass vacuously.
    assert md.version("kernels"), "Hugging Face's kernels package is missing from the test environment"


def test_transformers_ernie_moe_imports_from_repository_root():
    res = _run(
        "import kernels, transformers.models.ernie4_5_moe.modeling_ernie4_5_moe as m;"
        "print(kernels.__file__); print(m.Ernie4_5_MoeForCausalLM.__name__)",
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    kernels_file = Path(res.stdout.splitlines()[0]).resolve()
    assert REPO not in kernels_file.parents or "site-packages" in kernels_file.parts, (
        f"`import kernels` from the repository root resolved to {kernels_file}, inside the clone: a top-level "
        "package of this repository shadows Hugging Face's kernels"
    )


def test_library_imports_from_outside_the_clone(tmp_path):
    res = _run(
        "import ernie_platform.models, ernie_platform.kernels as k, workloads;"
        "from ernie_platform.kernels import moe_experts; print(k.__file__)",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert Path(res.stdout.strip()).resolve().is_relative_to(REPO / "ernie_platform")


def test_no_other_top_level_package_in_the_repository():
    # A new top-level package next to ernie_platform/ and workloads/ would be installed under a generic name (the
    # way kernels/ was); it belongs inside the library.
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages == OWN_TOP_LEVEL, f"top-level packages in the repository: {sorted(packages)}"


def test_no_installed_distribution_shares_our_top_level_names():
    owners = md.packages_distributions()
    for name in OWN_TOP_LEVEL:
        others = {_norm(d) for d in owners.get(name, [])} - {"ernie-platform"}
        assert not others, f"top-level import name {name!r} is also installed by {sorted(others)}"


@pytest.mark.skipif(
    os.environ.get("ERNIE_PLATFORM_UNLOCKED") == "1", reason="unlocked install (.ci/latest checks newest releases)"
)
def test_installed_versions_are_the_locked_ones():
    locked = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", LOCK.read_text(), re.M))
    assert len(locked) > 100 and "torch" in locked
    installed = {_norm(d.metadata["Name"]): d.version for d in md.distributions()}
    missing = sorted(n for n in locked if _norm(n) not in installed)
    wrong = sorted(
        f"{n}: locked {v}, installed {installed[_norm(n)]}"
        for n, v in locked.items()
        if _norm(n) in installed and installed[_norm(n)] != v
    )
    assert not wrong, (
        "installed without requirements/lock-cpu.txt (pip install -c requirements/lock-cpu.txt ...):\n"
        + "\n".join(wrong)
    )
    assert not missing, f"in the lock but not installed: {missing}"


def test_every_install_uses_a_lock():
    # README, CI and the images install the same versions: each `pip install` of the project or its dependencies
    # goes through requirements/lock-*.txt, as constraints (-c) or as the whole pinned list (--no-deps -r).
    # (`--no-deps` lines that name packages instead of the project resolve nothing: the GPU image's MegaBlocks.)
    files = [REPO / "README.md", REPO / ".ci" / "run", *sorted((REPO / "docker").glob("Dockerfile*"))]
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not re.search(r"(^|&&|RUN|run)\s*(python\S* -m )?pip install", line.strip()):
                continue
            if "--no-deps" in line and "-e" not in line.split():
                continue
            ok = "-c requirements/lock-" in line or ("--no-deps" in line and "-r requirements/lock-" in line)
            assert ok, f"{f.relative_to(REPO)}:{n} installs without the lock: {line}"
