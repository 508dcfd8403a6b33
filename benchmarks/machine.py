"""The CPU model a benchmark ran on (from /proc/cpuinfo; `platform.processor()` only says x86_64), recorded beside its
figures so that the tables in docs/ can name their machine."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"

