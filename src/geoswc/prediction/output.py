"""Writing predictions: to a file atomically or to standard output, in any output format, failures reported as
they come, predictions that are not localizable left out on request. A file never goes into a geoswc artifact
folder, and the text cells of a CSV are safe to open in a spreadsheet."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from geoswc.core import artifact_folders, atomic_files
from geoswc.prediction.results import (
    LocateFailure,
    OutputFormat,
    PredictionWriter,
    Result,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    """What :func:`write_predictions` wrote: predictions, failures, and predictions left out as not localizable."""

    located: int
    failed: int
    left_out: int


def write_predictions(
    results: Iterable[Result],
    output: Path | None,
    fmt: OutputFormat,
    leave_out: bool = False,
    on_failure: Callable[[LocateFailure], None] = lambda _: None,
) -> Written:
    """Write ``results`` to ``output`` atomically (None: standard output); a failure goes to ``on_failure`` as it
    comes and, except in the text format, is written as a row. ``leave_out`` drops the predictions that are not
    localizable (counted). A run in which every photo failed leaves an earlier ``output`` as it was; one whose
    predictions were all left out replaces it with an empty output (a CSV's header, an empty FeatureCollection).
    In a CSV, text cells that a spreadsheet would take for a formula get a ``'`` in front
    (:func:`geoswc.core.text_cells.csv_text`).

    Raises:
        InputError: ``output`` is a folder or lies inside a geoswc artifact folder (a model, an index...).
    """
    if output is not None:
        artifact_folders.claim_output(output)  # before any result is computed: nothing is located for nothing
    kept = _Kept(iter(results), leave_out)
    if output is None:
        with PredictionWriter(sys.stdout, fmt) as w:
            _write_results(iter(kept), w, on_failure)
    else:
        w = _write_output(kept, Path(output), fmt, on_failure)
    return Written(w.located, w.failed, kept.left_out)


class _Kept:
    """The results to write: all of them, or (``leave_out``) all but the predictions that are not localizable,
    which are counted."""

    def __init__(self, results: Iterator[Result], leave_out: bool) -> None:
        self.results, self.leave_out, self.left_out = results, leave_out, 0

    def __iter__(self) -> Iterator[Result]:
        for r in self.results:
            if self.leave_out and getattr(r, "localizable", None) is False:
                self.left_out += 1
                continue
            yield r


class _NothingLocated(Exception):
    """Abandons an output file that would hold no prediction, keeping the file that was there."""


def _write_output(
    kept: _Kept, output: Path, fmt: OutputFormat, on_failure: Callable[[LocateFailure], None]
) -> PredictionWriter:
    """Stream the results into ``output`` atomically. A run in which no photo was located leaves an earlier file
    as it was; one whose predictions were all left out as not localizable still replaces it (it has its answer:
    none of them)."""
    try:
        with atomic_files.atomic_writer(output, "w") as f, PredictionWriter(f, fmt) as w:  # type: ignore[arg-type]
            _write_results(iter(kept), w, on_failure)
            if not w.located and not kept.left_out and output.exists():
                raise _NothingLocated
    except _NothingLocated:
        log.warning("no photo was located: %s was left as it was", output)
    return w


def _write_results(
    results: Iterator[Result], writer: PredictionWriter, on_failure: Callable[[LocateFailure], None]
) -> None:
    for r in results:
        if isinstance(r, LocateFailure):
            on_failure(r)
            if writer.fmt == "text":  # a readable stream: the error was just reported
                writer.failed += 1
                continue
        writer.write(r)
