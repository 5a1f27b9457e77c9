"""Progress bars: on a terminal (or in a notebook) when asked for; never in logs, pipes or captured output, so
that a failing command's standard error is its one error line."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable[Any] | None = None, *, show: bool = True, **kw: Any) -> Any:
    """A tqdm bar over ``iterable`` (or updated by hand), shown when ``show`` and standard error is interactive."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(iterable, disable=not (show and interactive), **kw)
