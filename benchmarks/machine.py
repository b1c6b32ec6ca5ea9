"""What every benchmark table names: the machine it ran on (machines of this class differ from week to week: an AMD
EPYC with AVX2 one week, an Intel Xeon with AVX-512/AMX another)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name as `/proc/cpuinfo` gives it (else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
