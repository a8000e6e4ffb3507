"""What a benchmark ran on, for the header and JSON of the tools' reports."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _first_field(path: str, key: str) -> str | None:
    """The value after ``key:`` on the first line of ``path`` that starts with ``key``."""
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, library versions and the git state of ``onnxq/`` (it may be
    mid-change: an onnxq that fails to import is reported, not raised)."""
    import numpy as np
    import onnx
    import onnxruntime

    try:
        import onnxq

        onnxq_version = onnxq.__version__
    except Exception as exc:  # report, don't die here
        onnxq_version = f"import failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    git: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "onnxq"], cwd=REPO, capture_output=True, text=True
        ).stdout.splitlines()
        git = {"head": head, "onnxq_modified_files": sum(1 for line in dirty if line.strip())}
    mem_kb = (_first_field("/proc/meminfo", "MemTotal:") or "0 kB").split()[0]
    return {
        "cpu": _first_field("/proc/cpuinfo", "model name") or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_gb": round(int(mem_kb) * 1024 / 1e9, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "onnxq": onnxq_version,
        "numpy": np.__version__,
        "git": git,
    }
