"""Where a benchmark's figures come from: the command, the commit, the machine and the date.

Every benchmark that writes a results JSON stores :func:`provenance` under the key ``"provenance"``, and
``scripts/docs_tables.py`` prints it once under each table it renders from that file::

    {"command": "python benchmarks/x.py --out ...", "commit": "6412aa0...-dirty", "date": "2025-...Z",
     "machine": {"cpu": "AMD EPYC ...", "cores": 2, "gpu": null, "platform": "Linux-...", "python": "3.11.7"},
     "load_average": [4.6, 5.0, 5.5]}
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def commit() -> str | None:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files differ from it; None outside a git checkout."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu() -> str | None:
    """The first CUDA GPU's name and count (``"NVIDIA H100 80GB HBM3 x1"``), None without one or without torch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"


def provenance(command: str | None = None) -> dict[str, Any]:
    """The provenance block of a results JSON.

    Args:
        command: The command line that produced the results; by default the running one
            (``python`` and ``sys.argv``).

    Returns:
        ``command``, ``commit`` (``git rev-parse HEAD``, ``-dirty`` when the tree has changes), ``date`` (UTC,
        ISO 8601), ``machine`` (CPU model, cores, GPU or None, platform, Python) and ``load_average``.
    """
    return {
        "command": command if command is not None else shlex.join(["python", *sys.argv]),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "gpu": gpu(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
