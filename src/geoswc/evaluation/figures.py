"""Figures drawn off-screen and written atomically: every PNG geoswc writes goes through here."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from geoswc.core import atomic_files


def figure(**kw: Any) -> Any:
    """A matplotlib figure drawn off-screen (no pyplot state, no backend switch for the caller's process)."""
    from matplotlib.figure import Figure  # import-time cost (0.4 s): only the commands that draw need it

    return Figure(**kw)


def save_figure(fig: Any, path: str | Path) -> None:
    """Write a matplotlib figure as PNG atomically."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_files.write_bytes(path, buf.getvalue())
