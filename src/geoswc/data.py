"""Geotagged photo lists: a CSV (``image,lat,lon[,author]``) plus a folder, or a folder of GPS-EXIF photos.

Bad rows are never dropped silently: every reader returns a :class:`LoadReport` that counts them and
names the first few, and logs it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import Preprocess
from .errors import ImageError, InputError
from .images import DEFAULT_LIMITS, ImageLimits, ImageSource, _check_size, load_image, read_gps
from .transforms import augment, preprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif")


@dataclass(frozen=True)
class Record:
    """One geotagged photo. ``image`` is its id (the CSV's value, or the path relative to the folder)."""

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
        return (f"{self.source}: {self.kept} of {self.total} items usable, {len(self.skipped)} skipped: "
                f"{shown}{more}")

    def log(self) -> None:
        (log.warning if self.skipped else log.info)("%s", self.summary())


DRAFT_HEADROOM = 2
"""JPEGs are draft-decoded to at least this multiple of the input size before resizing."""


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _parse_coord(text: str | None, name: str, bound: float) -> float:
    if text is None or not text.strip():
        raise ValueError(f"missing {name}")
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} {text!r} is not finite")
    if not _DECIMAL.fullmatch(text.strip()):  # float() also takes '1_0' (= 10) and non-ASCII digits
        raise ValueError(f"{name} {text!r} is not a plain decimal number (like -12.345)")
    if abs(v) > bound:
        raise ValueError(f"{name} {v} is outside ±{bound:g}")
    return v


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"CSV file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read CSV {path}: {e.strerror or e}") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"CSV {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
            "save it as UTF-8 and try again"
        ) from e


def read_locations_csv(
    csv_path: str | Path, images_dir: str | Path | None = None, check_images: bool = True
) -> tuple[list[Record], LoadReport]:
    """Read ``image,lat,lon[,author]`` rows.

    Args:
        csv_path: the CSV file (UTF-8, header row required; extra columns are ignored).
        images_dir: folder the ``image`` paths are relative to (default: the CSV's folder).
        check_images: skip rows whose image file does not exist.

    Returns:
        The usable records, and the report of skipped rows (bad or missing coordinates, missing images,
        duplicate image ids).

    Raises:
        InputError: the file is missing, not UTF-8, or lacks a required column.
    """
    csv_path = Path(csv_path)
    root = Path(images_dir) if images_dir is not None else csv_path.parent
    if check_images and not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    text = _read_text(csv_path)
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
    except csv.Error as e:
        raise InputError(f"CSV {csv_path} cannot be parsed: {e}") from e
    missing = [c for c in ("image", "lat", "lon") if c not in header]
    if missing:
        raise InputError(
            f"CSV {csv_path} lacks column(s) {', '.join(missing)}; its header is {reader.fieldnames}. "
            "Expected a header with image,lat,lon (and optionally author)."
        )
    reader.fieldnames = header
    report = LoadReport(str(csv_path))
    records: list[Record] = []
    seen: set[str] = set()
    try:
        for line, row in enumerate(reader, start=2):
            report.total += 1
            image = (row.get("image") or "").strip()
            label = (image if len(image) <= 200 else image[:200] + "…") or f"line {line}"
            if not image:
                report.skip(label, "empty image name")
                continue
            try:
                lat = _parse_coord(row.get("lat"), "lat", 90.0)
                lon = _parse_coord(row.get("lon"), "lon", 180.0)
            except ValueError as e:
                report.skip(f"{label} (line {line})", str(e))
                continue
            if image in seen:
                report.skip(f"{label} (line {line})", "duplicate image id")
                continue
            path = root / image
            try:
                problem = "" if not check_images or path.is_file() else (
                    "image file not found" if not path.exists() else "not a regular file")
            except OSError as e:  # e.g. a name longer than the file system allows
                problem = f"unusable image path ({e.strerror or e})"
            if problem:
                report.skip(label, problem)
                continue
            seen.add(image)
            author = (row.get("author") or "").strip()
            records.append(Record(image, path, lat, lon, author))
    except csv.Error as e:
        raise InputError(f"CSV {csv_path} is malformed near line {reader.line_num}: {e}") from e
    report.log()
    return records, report


def scan_exif_folder(folder: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[list[Record], LoadReport]:
    """Records for every image below ``folder`` that carries GPS EXIF; the others are reported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    report = LoadReport(f"{folder} (GPS EXIF)")
    records: list[Record] = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
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


def read_photo_list(csv_path: str | Path, images_dir: str | Path | None = None) -> tuple[list[Record], LoadReport]:
    """The photos a CSV names in its ``image`` column, for locating them: positions are read as
    :func:`read_locations_csv` does when the CSV has ``lat``/``lon``, else left NaN. Missing image files and
    duplicate ids are reported and skipped."""
    csv_path = Path(csv_path)
    text = _read_text(csv_path)
    header = [h.strip().lower() for h in next(csv.reader(io.StringIO(text)), [])]
    if "lat" in header and "lon" in header:
        return read_locations_csv(csv_path, images_dir)
    if "image" not in header:
        raise InputError(f"CSV {csv_path} lacks an 'image' column; its header is {header}")
    root = Path(images_dir) if images_dir is not None else csv_path.parent
    report = LoadReport(str(csv_path))
    records: list[Record] = []
    seen: set[str] = set()
    reader = csv.DictReader(io.StringIO(text), fieldnames=header)
    next(reader, None)
    for line, row in enumerate(reader, start=2):
        report.total += 1
        image = (row.get("image") or "").strip()
        if not image or image in seen:
            report.skip(image or f"line {line}", "duplicate image id" if image else "empty image name")
            continue
        if not (root / image).is_file():
            report.skip(image, "image file not found")
            continue
        seen.add(image)
        records.append(Record(image, root / image, math.nan, math.nan, (row.get("author") or "").strip()))
    report.log()
    return records, report


def load_records(csv_path: str | Path | None, images_dir: str | Path | None) -> tuple[list[Record], LoadReport]:
    """A CSV's records when ``csv_path`` is given, else the GPS-EXIF photos of ``images_dir``."""
    if csv_path is not None:
        return read_locations_csv(csv_path, images_dir)
    if images_dir is None:
        raise InputError("give a CSV (--csv) or a folder of photos with GPS EXIF (--images)")
    return scan_exif_folder(images_dir)


def records_arrays(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    """``(lat, lon)`` arrays ``(N,)`` of records."""
    return (np.array([r.lat for r in records], np.float64), np.array([r.lon for r in records], np.float64))


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, preprocessed images. Items are ``(index, tensor | None, error | None)``: a bad image
    yields its error instead of stopping the whole batch job.

    With ``views > 1``, each item holds ``views`` tensors stacked ``(V, 3, S, S)``: the plain view first,
    then random augmentations seeded by ``(seed, index)`` (the same on every run).
    """

    def __init__(self, paths: Sequence[ImageSource], pre: Preprocess, views: int = 1, seed: int = 0,
                 limits: ImageLimits = DEFAULT_LIMITS, train_augment: bool = False) -> None:
        self.paths = list(paths)
        self.pre, self.views, self.seed, self.limits = pre, views, seed, limits
        self.train_augment = train_augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, i: int) -> Image.Image:
        src = self.paths[i]
        if isinstance(src, Image.Image):
            _check_size(src, f"<image {i + 1}>", self.limits)  # no pixels, or a pixel bomb: ImageError
            try:
                return src if src.mode == "RGB" else src.convert("RGB")
            except (OSError, ValueError) as e:
                raise ImageError(f"<image {i + 1}> (mode {src.mode}) cannot be converted to RGB: {e}") from e
        # JPEG draft decoding with 2x head-room: enough for augmented crops, and the same decode for every
        # view, so a cached plain view equals what inference computes for the photo.
        return load_image(src, self.limits, draft_size=self.pre.image_size * DRAFT_HEADROOM)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, ImageError | None]:
        try:
            img = self._decode(i)
        except ImageError as e:
            return i, None, e
        return i, make_views(img, self.pre, i, views=self.views, seed=self.seed, train_augment=self.train_augment,
                             epoch=self.epoch), None


def make_views(img: Image.Image, pre: Preprocess, index: int, *, views: int = 1, seed: int = 0,
               train_augment: bool = False, epoch: int = 0) -> torch.Tensor:
    """The input tensor(s) of photo number ``index``, as :class:`ImageDataset` (and the shard reader) make them.

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


def collate(items: Iterable[tuple[int, torch.Tensor | None, ImageError | None]]):
    """Batch the good items; return the bad ones beside them as ``[(index, error)]``."""
    items = list(items)
    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, e) for i, t, e in items if t is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    x = torch.stack([t for _, t in good]) if good else None
    return idx, x, bad


def author_folds(authors: Sequence[str], k: int = 5) -> np.ndarray:
    """Assign photos to ``k`` folds so that no author spans two folds, balancing photo counts.

    Authors (largest first, ties by name) go to the fold with the fewest photos; photos without an
    author are treated as authors of their own. Returns the fold of each photo ``(N,)``.
    """
    if k < 2:
        raise InputError(f"need at least 2 folds, got {k}")
    keys = [a if a else f"\x00{i}" for i, a in enumerate(authors)]
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
