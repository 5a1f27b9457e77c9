"""Small JPEG thumbnails of the gallery photos, stored inside an index folder (``geoswc index --thumbnails N``):
the evidence a search-within-cell estimate rests on, shown beside the retrieved neighbours.

On disk, beside the rest of the index (:mod:`geoswc.gallery.files`):

* ``thumbnails.bin``: the JPEG bytes of every thumbnail, concatenated in the order they were added. It is never
  hashed whole (millions of rows at MP-16 scale): each thumbnail is checked against its own digest when read.
* ``thumbnails.safetensors``: per gallery row (final row order), ``start`` and ``length`` (bytes in
  ``thumbnails.bin``; length 0: the photo has no thumbnail) and ``blake2b`` (64-bit digest of the bytes).
  Its sha256, size and the settings go into ``index.json`` (sealed), checked at load.

Thumbnails are plain baseline JPEGs re-encoded by Pillow from the decoded pixels (:func:`geoswc.data.images.load_image`:
size limits, EXIF orientation, refusal of corrupt files): no metadata of the original is carried over.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from geoswc.core import tensor_files
from geoswc.core.errors import ArtifactError, ImageError, InputError, SettingError
from geoswc.data.images import DEFAULT_LIMITS, ImageLimits, ImageSource, load_image
from geoswc.data.records import path_under, worker_count

log = logging.getLogger(__name__)

BIN_FILE = "thumbnails.bin"
TABLE_FILE = "thumbnails.safetensors"
MIN_SIDE, MAX_SIDE = 32, 512
"""Bounds of ``--thumbnails`` (the longest side in pixels; 0: none)."""
MAX_BYTES = 32 << 10
"""Largest thumbnail stored: quality, then size, is lowered until it fits."""
QUALITIES = (80, 70, 60, 50, 40)
"""JPEG qualities tried, best first, before the size is lowered."""


@dataclass(frozen=True)
class ThumbnailSettings:
    """How the thumbnails of an index were made (recorded in ``index.json``)."""

    max_side: int
    """Longest side in pixels (the ``--thumbnails`` value)."""
    quality: int = QUALITIES[0]
    max_bytes: int = MAX_BYTES


def check_side(max_side: int) -> int:
    """``max_side`` when it is 0 (no thumbnails) or within ``MIN_SIDE..MAX_SIDE``, else a :class:`SettingError`."""
    if max_side != 0 and not MIN_SIDE <= max_side <= MAX_SIDE:
        raise SettingError(
            f"thumbnails must be 0 (none) or a longest side in {MIN_SIDE}..{MAX_SIDE} px (128 is a "
            f"good size), got {max_side}",
            None,
            "thumbnails",
        )
    return max_side


def digest(data: bytes) -> int:
    """64-bit BLAKE2b of a thumbnail's bytes (what ``thumbnails.safetensors`` records)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def make_thumbnail(
    source: ImageSource, settings: ThumbnailSettings, limits: ImageLimits = DEFAULT_LIMITS, name: str | None = None
) -> bytes:
    """A baseline JPEG of the photo, upright, its longest side at most ``settings.max_side`` px and its size at
    most ``settings.max_bytes``; nothing of the original file but its pixels is carried over.

    Raises:
        ImageError: the photo cannot be decoded safely (too large, corrupt, truncated, not an image).
    """
    img = load_image(source, limits, draft_size=settings.max_side, name=name)
    side = settings.max_side
    while side >= 8:
        small = img.copy()
        small.thumbnail((side, side), Image.Resampling.LANCZOS)
        pixels = Image.fromarray(np.asarray(small.convert("RGB")))  # a fresh image: no info, EXIF or ICC profile
        for q in QUALITIES:
            buf = io.BytesIO()
            pixels.save(buf, format="JPEG", quality=q, optimize=True, progressive=False)
            if buf.tell() <= settings.max_bytes:
                return buf.getvalue()
        side = side * 3 // 4
    raise ImageError(f"{name or 'a photo'} does not fit a thumbnail of {settings.max_bytes} bytes", kind="too_large")


class ThumbnailWriter:
    """Collects thumbnails as gallery rows are staged (:class:`geoswc.gallery.files.GalleryWriter`), then writes
    ``thumbnails.bin`` and ``thumbnails.safetensors`` into the index folder in the final row order.

    Args:
        staged: ``thumbnails.bin`` in the gallery writer's staging folder (:class:`geoswc.core.atomic_files.Staging`
            opens and             closes it); :meth:`finish` moves it into the index folder.
        settings: how the thumbnails were made.
    """

    def __init__(self, staged: BinaryIO, settings: ThumbnailSettings) -> None:
        self.settings = settings
        self._out = staged
        self._path = Path(staged.name)
        self._start: list[NDArray[np.int64]] = []
        self._length: list[NDArray[np.int32]] = []
        self._digest: list[NDArray[np.uint64]] = []
        self.size = 0

    def add(self, thumbs: Sequence[bytes | None]) -> None:
        """The thumbnails of the next staged rows, in staged order (None: that photo has none)."""
        start = np.zeros(len(thumbs), np.int64)
        length = np.zeros(len(thumbs), np.int32)
        dig = np.zeros(len(thumbs), np.uint64)
        for i, t in enumerate(thumbs):
            if t:
                if len(t) > self.settings.max_bytes:
                    raise InputError(f"a thumbnail of {len(t)} bytes is above the limit of {self.settings.max_bytes}")
                start[i], length[i], dig[i] = self.size, len(t), digest(t)
                self._out.write(t)
                self.size += len(t)
        self._start.append(start)
        self._length.append(length)
        self._digest.append(dig)

    def finish(self, folder: Path, perm: NDArray[np.int64]) -> dict[str, Any]:
        """Write the files into ``folder`` with rows in final order (``perm``: final row -> staged row), after the
        staged file was closed; returns the record for ``index.json``."""
        with open(self._path, "rb") as f:
            os.fsync(f.fileno())  # on disk before it is renamed into the index
        cols = {
            "start": np.concatenate([np.zeros(0, np.int64), *self._start])[perm],
            "blake2b": np.concatenate([np.zeros(0, np.uint64), *self._digest])[perm],
            "length": np.concatenate([np.zeros(0, np.int32), *self._length])[perm],
        }
        sha = tensor_files.save_tensors(folder / TABLE_FILE, cols)
        os.replace(self._path, folder / BIN_FILE)
        present = int((cols["length"] > 0).sum())
        log.info("%d of %d gallery photos have a thumbnail (%.1f MiB)", present, len(perm), self.size / 2**20)
        return {
            "max_side": self.settings.max_side,
            "quality": self.settings.quality,
            "max_bytes": self.settings.max_bytes,
            "count": present,
            "bin_bytes": self.size,
            "bytes": (folder / TABLE_FILE).stat().st_size,
            "sha256": sha,
        }


def remove_files(folder: Path) -> None:
    """Remove an earlier build's thumbnails from an index folder rebuilt without them."""
    for name in (BIN_FILE, TABLE_FILE):
        (folder / name).unlink(missing_ok=True)


class Thumbnails:
    """The thumbnails of a loaded index: :meth:`get` reads one row's JPEG bytes and checks them against their
    digest. Open with :meth:`open`.

    Attributes:
        settings: how they were made.
        count: rows that have one.
    """

    def __init__(self, path: Path, table: dict[str, NDArray[Any]], settings: ThumbnailSettings, count: int) -> None:
        self.path, self.settings, self.count = path, settings, count
        self._start, self._length, self._digest = table["start"], table["length"], table["blake2b"]

    def __len__(self) -> int:
        return len(self._length)

    @classmethod
    def open(cls, folder: Path, record: dict[str, Any], rows: int) -> Thumbnails:
        """Check ``thumbnails.safetensors`` whole against ``record`` (``index.json`` 's entry) and the size of
        ``thumbnails.bin``, then map the table.

        Raises:
            ArtifactError: a missing, truncated or changed file, or a table that does not fit the index.
        """
        table_path, bin_path = folder / TABLE_FILE, folder / BIN_FILE
        for p in (table_path, bin_path):
            if not p.is_file():
                raise ArtifactError(
                    f"gallery index {folder} lacks {p.name} (its index.json lists thumbnails); "
                    "rebuild it with `geoswc index --thumbnails`"
                )
        if (
            table_path.stat().st_size != int(record["bytes"])
            or tensor_files.sha256_file(table_path) != record["sha256"]
        ):
            raise ArtifactError(
                f"gallery index {table_path} is damaged or was changed; rebuild the index or restore the original file"
            )
        if bin_path.stat().st_size != int(record["bin_bytes"]):
            raise ArtifactError(
                f"gallery index {bin_path} is truncated or was changed ({bin_path.stat().st_size} "
                f"bytes, {record['bin_bytes']} expected); rebuild the index or restore the original"
            )
        data = np.memmap(table_path, np.uint8, mode="r")
        header, base = tensor_files.safetensors_header(bytes(data[: 8 + tensor_files.header_length(data)]), len(data))
        table = {k: tensor_files.tensor_view(data, header[k], base) for k in ("start", "length", "blake2b")}
        settings = ThumbnailSettings(int(record["max_side"]), int(record["quality"]), int(record["max_bytes"]))
        start, length = table["start"], table["length"].astype(np.int64)
        if (
            any(v.shape != (rows,) for v in table.values())
            or (length < 0).any()
            or (length > settings.max_bytes).any()
            or (start < 0).any()
            or (rows and int((start + length).max()) > int(record["bin_bytes"]))
        ):
            raise ArtifactError(f"gallery index {table_path} does not fit its index.json; rebuild the index")
        return cls(bin_path, table, settings, int((length > 0).sum()))

    def has(self, row: int) -> bool:
        """Whether gallery row ``row`` has a thumbnail."""
        return 0 <= row < len(self) and int(self._length[row]) > 0

    def span(self, row: int) -> tuple[int, int]:
        """``(start, stop)``: the bytes of row ``row``'s thumbnail in ``thumbnails.bin`` (empty: none)."""
        start = int(self._start[row])
        return start, start + int(self._length[row])

    def get(self, row: int) -> bytes | None:
        """The JPEG bytes of gallery row ``row``, or None when it has none.

        Raises:
            InputError: ``row`` is not a row of the gallery.
            ArtifactError: the bytes fail their digest (``thumbnails.bin`` was damaged or changed).
        """
        if not 0 <= row < len(self):
            raise InputError(f"gallery row {row} is out of range (the gallery has {len(self)} rows)")
        start, stop = self.span(row)
        if stop == start:
            return None
        data = tensor_files.read_span(self.path, start, stop)
        if digest(data) != int(self._digest[row]):
            raise ArtifactError(
                f"the thumbnail of gallery row {row} in {self.path} is damaged or was changed (it "
                "fails its digest); rebuild the index or restore the original file"
            )
        return data


def _thumbnail_or_why(
    path: Path | None, name: str, settings: ThumbnailSettings, limits: ImageLimits
) -> tuple[bytes | None, str]:
    """The thumbnail of one photo file, or None and why it cannot be made."""
    try:
        if path is None or not path.is_file():
            raise ImageError(f"{name} is not a photo file inside the image folder", kind="unreadable")
        return make_thumbnail(path, settings, limits, name), ""
    except ImageError as e:
        return None, str(e)


def _kept(thumb: bytes | None, why: str, name: str) -> bytes | None:
    if thumb is None:
        log.warning("no thumbnail for %s: %s", name, why)
    return thumb


def thumbnails_of(
    paths: Sequence[Path | None],
    names: Sequence[str],
    settings: ThumbnailSettings,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> list[bytes | None]:
    """The thumbnails of photos on disk; a photo that cannot be thumbnailed (no path, unreadable, corrupt) gets
    None and one logged warning naming it."""
    return [
        _kept(*_thumbnail_or_why(path, name, settings, limits), name) for path, name in zip(paths, names, strict=True)
    ]


class _ThumbnailJobs(torch.utils.data.Dataset):
    """Item ``i``: ``(thumbnail | None, why, name)`` of the photo ``root / names[i]`` (made in a loader's worker)."""

    def __init__(self, root: Path, names: Sequence[str], settings: ThumbnailSettings, limits: ImageLimits) -> None:
        self.root, self.names, self.settings, self.limits = root, names, settings, limits

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[bytes | None, str, str]:
        name = self.names[i]
        return (*_thumbnail_or_why(path_under(self.root, name), name, self.settings, self.limits), name)


def thumbnail_stream(
    root: Path,
    names: Sequence[str],
    settings: ThumbnailSettings,
    workers: int = 0,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Iterator[bytes | None]:
    """The thumbnails of the photos ``root / name`` in the order of ``names``, made by ``workers`` processes (0:
    this one) while the caller writes the ones before; a photo that cannot be thumbnailed gives None and one
    logged warning naming it."""
    jobs = torch.utils.data.DataLoader(
        _ThumbnailJobs(root, names, settings, limits),
        batch_size=None,
        num_workers=worker_count(workers),
        collate_fn=_as_is,
    )
    return (_kept(thumb, why, name) for thumb, why, name in jobs)


def _as_is(x: Any) -> Any:
    return x
