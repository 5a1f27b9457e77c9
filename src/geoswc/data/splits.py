"""Author-disjoint splits: whole photographers on one side, so that a model is never evaluated on the photographers
it learnt from (their photos of one place are near duplicates). One notion of a photographer (:func:`author_keys`)
serves the cross-fitting folds and the validation split of training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from geoswc.core import artifact_folders, atomic_files, text_cells
from geoswc.core.errors import InputError
from geoswc.data.records import Record


def author_keys(authors: Sequence[str]) -> list[str]:
    """The photographer of each photo: its author, or, for a photo without one, a key of its own."""
    return [a if a else f"\x00{i}" for i, a in enumerate(authors)]


def author_folds(authors: Sequence[str], k: int = 5) -> np.ndarray:
    """Assign photos to ``k`` folds so that no author spans two folds, balancing photo counts.

    Authors (largest first, ties by name) go to the fold with the fewest photos; photos without an
    author are treated as authors of their own. Returns the fold of each photo ``(N,)``.
    """
    if k < 2:
        raise InputError(f"need at least 2 folds, got {k}")
    keys = author_keys(authors)
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(keys):
        groups.setdefault(a, []).append(i)
    if len(groups) < k:
        raise InputError(f"{len(groups)} authors cannot fill {k} author-disjoint folds")
    sizes = np.zeros(k, np.int64)
    fold = np.empty(len(keys), np.int64)
    for a in sorted(groups, key=lambda a: (-len(groups[a]), a)):
        f = int(np.argmin(sizes))
        fold[groups[a]] = f
        sizes[f] += len(groups[a])
    return fold


def validation_split(authors: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(train, validation)`` with whole photographers on one side: ``fraction`` of the authors
    (a photo without one counts as its own author) are drawn at random (``seed``) for validation.

    Raises:
        InputError: when either side would be empty.
    """
    groups = np.array(author_keys(authors))
    names = np.unique(groups)
    rng = np.random.default_rng((seed, 0x7A1))
    k = math.ceil(fraction * len(names)) if fraction > 0 else 0
    if k == 0 or k >= len(names):
        raise InputError(
            f"val_fraction {fraction} of {len(names)} photographers leaves "
            f"{'no validation' if k == 0 else 'no training'} photos; change it or use 0"
        )
    held = np.isin(groups, rng.choice(names, size=k, replace=False))
    return np.nonzero(~held)[0], np.nonzero(held)[0]


def write_author_split(
    records: Sequence[Record], out: Path, test: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Split photos into ``out/train.csv`` and ``out/test.csv`` (``image,lat,lon,author``, written atomically) with
    every photographer on one side: ``test`` of the photographers (a photo without an author counts as its own)
    drawn at random (``seed``) for the test side.

    Raises:
        InputError: when either side would be empty.
    """
    train_rows, test_rows = validation_split([r.author for r in records], test, seed)
    sides = ([records[i] for i in train_rows], [records[i] for i in test_rows])
    for name, rows in zip(("train.csv", "test.csv"), sides, strict=True):
        lines = [text_cells.csv_row(["image", "lat", "lon", "author"])]
        lines += [text_cells.csv_row([r.image, r.lat, r.lon, r.author]) for r in rows]  # for geoswc to read: as named
        atomic_files.write_text(artifact_folders.claim_output(atomic_files.ensure_dir(out) / name), "".join(lines))
    return sides
