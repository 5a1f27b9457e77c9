"""Progress bars: on a terminal (or in a notebook) when asked for; never in logs, pipes or captured output, so
that a failing command's standard error is its one error line. Third-party libraries' chatter is kept out the
same way (:func:`quiet`)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, show: bool = True, **kw: Any) -> Any:
    """A tqdm bar over ``iterable`` (or updated by hand), shown when ``show`` and standard error is interactive."""
    return tqdm(iterable, disable=not (show and interactive()), **kw)


def interactive() -> bool:
    """Whether standard error is a terminal or a notebook (where progress bars may go)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` (a library's) for the length of the block."""
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)
