"""Geotagged photo lists and the datasets that decode them.

A photo list is a CSV (``image,lat,lon[,author]``, or a benchmark's published layout: see
:mod:`geoswc.data.layouts`) plus a folder, or a folder of GPS-EXIF photos; a coordinate list is a CSV with latitude
and longitude columns. Bad rows are never dropped silently: every reader
returns a :class:`LoadReport` that counts them and names the first few, and logs it.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from geoswc.core.config import Preprocess
from geoswc.core.errors import ImageError, InputError
from geoswc.core.progress import progress_bar
from geoswc.data.images import (
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    ImageLimits,
    read_gps,
)
from geoswc.data.layouts import parse_columns, resolve_layout
from geoswc.data.transforms import augment, preprocess

log = logging.getLogger(__name__)

DRAFT_HEADROOM = 2
"""JPEGs are draft-decoded to at least this multiple of the input size before resizing."""


@dataclass(frozen=True)
class Record:
    """One photo. ``image`` is its id (the CSV's value, or the path relative to the folder); ``lat``/``lon``
    are NaN when the list gave no position (photos to locate)."""

    image: str
    path: Path
    lat: float
    lon: float
    author: str = ""


@dataclass
class LoadReport:
    """What a reader kept and what it skipped, and why."""

    source: str
    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.total - len(self.skipped)

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append((item, reason))

    def summary(self, first: int = 5) -> str:
        if not self.skipped:
            return f"{self.source}: {self.kept} of {self.total} items usable"
        shown = "; ".join(f"{item}: {why}" for item, why in self.skipped[:first])
        more = f" (and {len(self.skipped) - first} more)" if len(self.skipped) > first else ""
        return f"{self.source}: {self.kept} of {self.total} items usable, {len(self.skipped)} skipped: {shown}{more}"

    def log(self) -> None:
        (log.warning if self.skipped else log.info)("%s", self.summary())


MISSING_IMAGE = "image file not found"
"""The reason a photo list's row is skipped when its image file is not there."""

_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_coord(text: str | None, name: str, bound: float) -> float:
    """A latitude (``bound`` 90) or longitude (180) written as a plain decimal number.

    Raises:
        ValueError: missing, not a plain finite decimal (``float`` also takes ``1_0`` and other digits), or
            out of range; the message names the value.
    """
    if text is None or not text.strip():
        raise ValueError(f"missing {name}")
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} {text!r} is not finite")
    if not _DECIMAL.fullmatch(text.strip()):
        raise ValueError(f"{name} {text!r} is not a plain decimal number (like -12.345)")
    if abs(v) > bound:
        raise ValueError(f"{name} {v} is outside ±{bound:g}")
    return v


def csv_table(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header (as written) and the ``(line, row)`` of a UTF-8 CSV, read as a stream (never whole in memory),
    ``line`` the file line its record starts on (a quoted field may span lines); a malformed file, or one that is
    not UTF-8, is an :class:`InputError` when the reader reaches the fault."""
    if not path.is_file():
        raise InputError(f"CSV file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed when the rows are read
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read CSV {path}: {e.strerror or e}") from e
    reader = csv.reader(f)

    def rows() -> Iterator[tuple[int, list[str]]]:
        with f:
            try:
                start = reader.line_num + 1
                for row in progress_bar(reader, desc=f"reading {path.name}", unit="row", show=size > 8 << 20):
                    yield start, row
                    start = reader.line_num + 1
            except csv.Error as e:
                raise InputError(f"CSV {path} is malformed near line {reader.line_num}: {e}") from None
            except UnicodeDecodeError as e:
                raise InputError(
                    f"CSV {path} is not UTF-8 text (near line {reader.line_num + 1}: byte "
                    f"{e.object[e.start : e.start + 1]!r}); save it as UTF-8 and try again"
                ) from None

    it = rows()
    return [h.strip() for h in next(it, (1, []))[1]], it


def read_coordinates(path: str | Path, columns: str | None = None) -> tuple[np.ndarray, np.ndarray, LoadReport]:
    """The latitudes and longitudes of a CSV, ``(N,)`` each: its ``lat``/``lon`` columns (or another known
    layout's, header names in any case, see :mod:`geoswc.data.layouts`); bad rows are reported and skipped.

    Args:
        path: the CSV file.
        columns: ``lat=COL,lon=COL`` for another layout.

    Raises:
        InputError: no such columns, or no usable row.
    """
    path = Path(path)
    header, rows = csv_table(path)
    cols = resolve_layout(header, str(path), ("lat", "lon"), _column_map(columns, "--columns"), "--columns")
    report = LoadReport(str(path))
    lat, lon = array("d"), array("d")  # 8 bytes a value while reading (a list holds a Python float per value)
    for n, row in rows:
        report.total += 1
        try:
            a, b = parse_coord(cols.get(row, "lat"), "lat", 90), parse_coord(cols.get(row, "lon"), "lon", 180)
        except ValueError as e:
            report.skip(f"line {n}", str(e))
            continue
        lat.append(a)
        lon.append(b)
    report.log()
    if not lat:
        raise InputError(f"{path} holds no usable coordinates: {report.summary()}")
    return np.frombuffer(lat, np.float64).copy(), np.frombuffer(lon, np.float64).copy(), report


def _column_map(columns: str | None, flag: str) -> dict[str, str]:
    try:
        return parse_columns(columns)
    except ValueError as e:
        raise InputError(f"{flag}: {e}") from None


def row_label(image: str, line: int) -> str:
    """How a report names a CSV row: ``IMAGE (line N)`` (long names cut); :func:`parse_row_label` reads it back."""
    return f"{image if len(image) <= 200 else image[:200] + '…'} (line {line})"


_ROW_LABEL = re.compile(r"(.*) \(line ([0-9]+)\)", re.DOTALL)
_BARE_ROW = re.compile(r"line ([0-9]+)")


def parse_row_label(item: str) -> tuple[str, int | None]:
    """``(image, line)`` of a report item made by :func:`row_label`, ``("", line)`` of a row without an image
    (``line N``), ``(item, None)`` of any other item."""
    if m := _ROW_LABEL.fullmatch(item):
        return m.group(1), int(m.group(2))
    if m := _BARE_ROW.fullmatch(item):
        return "", int(m.group(1))
    return item, None


def read_photo_csv(
    csv_path: str | Path,
    images_dir: str | Path | None = None,
    *,
    positions: bool = True,
    check_images: bool = True,
    columns: str | None = None,
) -> tuple[list[Record], LoadReport]:
    """The photos a CSV names, with their positions and authors, in ``image,lat,lon[,author]`` or a benchmark's
    published layout (see :mod:`geoswc.data.layouts`).

    Args:
        csv_path: the CSV file (UTF-8, header row required; extra columns are ignored).
        images_dir: folder the ``image`` paths are relative to (default: the CSV's folder).
        positions: require ``lat``/``lon`` columns; with False (photos to locate) they are read when present,
            else left NaN.
        check_images: skip rows whose image file does not exist.
        columns: ``image=COL,lat=COL,lon=COL,author=COL`` (any subset) for a layout the reader does not know.

    Returns:
        The usable records, and the report of skipped rows (bad or missing coordinates, missing images,
        duplicate image ids).

    Raises:
        InputError: the file is missing, not UTF-8, or lacks a required column.
    """
    csv_path = Path(csv_path)
    root = Path(images_dir) if images_dir is not None else csv_path.parent
    if check_images and not root.is_dir():
        raise InputError(
            f"image folder not found: {root} ({root.resolve()}); "
            + ("check --data.images" if images_dir is not None else "give --data.images, the folder of the photos")
        )
    header, rows = csv_table(csv_path)
    cols = resolve_layout(
        header,
        str(csv_path),
        ("image", "lat", "lon") if positions else ("image",),
        _column_map(columns, "--data.columns"),
    )
    has_coords = cols.has("lat") and cols.has("lon")
    report = LoadReport(str(csv_path))
    records: list[Record] = []
    seen: set[str] = set()
    for line, row in rows:
        report.total += 1
        image = cols.image(row)
        if not image:
            report.skip(f"line {line}", "empty image name")
            continue
        try:
            lat, lon = (
                (parse_coord(cols.get(row, "lat"), "lat", 90.0), parse_coord(cols.get(row, "lon"), "lon", 180.0))
                if has_coords
                else (math.nan, math.nan)
            )
            if image in seen:
                raise ValueError("duplicate image id")
        except ValueError as e:
            report.skip(row_label(image, line), str(e))
            continue
        problem = _image_problem(root, image) if check_images else ""
        if problem:
            report.skip(row_label(image, line), problem)
            continue
        seen.add(image)
        records.append(Record(image, root / image, lat, lon, (cols.get(row, "author") or "").strip()))
    report.log()
    return records, report


def no_usable_photo(csv_path: str | Path, images_dir: str | Path | None, report: LoadReport) -> str:
    """Why a photo CSV gave no usable photo, in one line. When its rows name image files that are not there,
    the folder they were looked for in (resolved) and the flag to check: ``--data.images``, or to give it when
    it was left out (then the names are looked up beside the CSV)."""
    root = Path(images_dir) if images_dir is not None else Path(csv_path).parent
    missing = [item for item, why in report.skipped if why == MISSING_IMAGE]
    if not missing:
        return f"{csv_path} holds no usable photo: {report.summary(first=3)}"
    fix = (
        "check --data.images, the folder the CSV's image names are relative to"
        if images_dir is not None
        else "give --data.images, the folder the CSV's image names are relative to (without it, the CSV's own folder)"
    )
    return (
        f"no photo {csv_path} names was found in {root.resolve()}: {len(missing)} of its {report.total} rows name "
        f"an image file not there (first: {missing[0]}); {fix}"
    )


def path_under(root: Path, image: str) -> Path | None:
    """``root / image``, or None when a photo list's ``image`` would leave the folder (an absolute path, or
    ``..``): photo lists name photos relative to their folder."""
    return None if Path(image).is_absolute() or ".." in Path(image).parts else root / image


def _image_problem(root: Path, image: str) -> str:
    """Why the image ``image`` of folder ``root`` is not a usable image file ("" when it is one)."""
    path = path_under(root, image)
    if path is None:
        return "outside the image folder (an absolute path, or '..'); name photos relative to the folder"
    try:
        return "" if path.is_file() else MISSING_IMAGE if not path.exists() else "not a regular file"
    except OSError as e:  # e.g. a name longer than the file system allows
        return f"unusable image path ({e.strerror or e})"


def scan_exif_folder(folder: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[list[Record], LoadReport]:
    """Records for every image below ``folder`` that carries GPS EXIF; the others are reported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    report = LoadReport(f"{folder} (GPS EXIF)")
    records: list[Record] = []
    for path in find_photos(folder):
        report.total += 1
        rel = path.relative_to(folder).as_posix()
        try:
            gps = read_gps(path, limits)
        except ImageError as e:
            report.skip(rel, str(e))
            continue
        if gps is None:
            report.skip(rel, "no GPS position in its EXIF")
            continue
        records.append(Record(rel, path, gps[0], gps[1]))
    report.log()
    return records, report


def find_photos(folder: Path) -> list[Path]:
    """The image files below ``folder`` (by their endings, :data:`~geoswc.data.images.IMAGE_EXTENSIONS`), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_records(
    csv_path: str | Path | None, images_dir: str | Path | None, columns: str | None = None
) -> tuple[list[Record], LoadReport]:
    """A CSV's geotagged photos when ``csv_path`` is given (``columns`` maps its layout, see
    :func:`read_photo_csv`), else the GPS-EXIF photos of ``images_dir``."""
    if csv_path is not None:
        return read_photo_csv(csv_path, images_dir, columns=columns)
    if images_dir is None:
        raise InputError("give a CSV of geotagged photos, or a folder of photos with GPS EXIF")
    return scan_exif_folder(images_dir)


# -- decoding datasets ------------------------------------------------------------------------------------


Item = tuple[int, torch.Tensor | None, Exception | None, Any]
"""A dataset item: ``(key, tensor or None, error or None, meta)``; the key orders the items."""


class Batch(NamedTuple):
    """Items batched by :func:`collate`: the good ones stacked, the bad ones beside them."""

    keys: torch.Tensor
    """``(b,)`` keys of the good items."""
    images: torch.Tensor | None
    """``(b, ...)``, None when no item of the batch decoded."""
    metas: list[Any]
    bad: list[tuple[int, Any, Exception]]
    """``(key, meta, error)`` of each item that failed."""


def collate(items: Iterable[Item]) -> Batch:
    """Batch the good items of a dataset (:class:`~geoswc.data.shards.ShardDataset`)."""
    items = list(items)
    good = [(k, x, m) for k, x, _, m in items if x is not None]
    return Batch(
        torch.tensor([k for k, _, _ in good], dtype=torch.long),
        torch.stack([x for _, x, _ in good]) if good else None,
        [m for _, _, m in good],
        [(k, m, e) for k, x, e, m in items if x is None],
    )


def worker_count(requested: int) -> int:
    """``requested`` decoding processes, capped at the machine's CPU cores (with a warning)."""
    cores = os.cpu_count() or 1
    if requested > cores:
        log.warning("%d decoding workers asked for, %d CPU cores here: using %d", requested, cores, cores)
        return cores
    return max(0, requested)


def loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int = 0) -> Iterable[Batch]:
    """A DataLoader of :class:`Batch` es (``num_workers`` decoding processes, at most one per core; 0: this one)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=worker_count(num_workers), collate_fn=collate
    )


def make_views(
    img: Image.Image,
    pre: Preprocess,
    index: int,
    *,
    views: int = 1,
    seed: int = 0,
    train_augment: bool = False,
    epoch: int = 0,
) -> torch.Tensor:
    """The input tensor(s) of photo number ``index``, as the shard reader makes them.

    Returns:
        ``(3, S, S)`` for one view; ``(V, 3, S, S)`` for ``views > 1``: the plain view, then augmentations
        seeded by ``(seed, index)``. With ``train_augment``, random training views seeded by
        ``(seed, epoch, index)`` instead: one ``(3, S, S)``, or ``views`` of them stacked.
    """
    if train_augment:
        rng = np.random.default_rng((seed, epoch, index))
        if views == 1:
            return augment(img, pre, rng)
        return torch.stack([augment(img, pre, rng) for _ in range(views)])
    if views == 1:
        return preprocess(img, pre)
    rng = np.random.default_rng((seed, index))
    return torch.stack([preprocess(img, pre)] + [augment(img, pre, rng) for _ in range(views - 1)])
