"""WebDataset tar shards of geotagged photos: written from a CSV + image folder, streamed back.

A shard ``shard-000000.tar`` holds, for each sample ``KEY`` (the photo's row number, ``%09d``), the encoded
photo ``KEY.jpg`` (or ``.png``, ``.webp``, ...) as it was on disk and ``KEY.json`` =
``{"lat", "lon", "author", "image"}`` (``image``: the photo's id, its name in the CSV). ``shards.json``
beside the shards lists them with their sample counts (webdataset's ``wids`` shard-index format).

Reading streams one shard at a time (nothing is held beyond a shuffle buffer); any WebDataset shard set
with an image and such a ``.json`` per sample works. Shards are local files only: a shard list never runs
a command or fetches anything. Bad samples and unreadable shards are reported and skipped, never fatal.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from geoswc.core import artifact_folders, atomic_files, distributed, json_records
from geoswc.core.config import Preprocess, digest
from geoswc.core.errors import ImageError, InputError
from geoswc.core.progress import progress_bar
from geoswc.data.images import (
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    ImageLimits,
    ImageSource,
    check_size,
    load_image,
    open_image,
    read_gps,
    read_image_file,
)
from geoswc.data.images import source_name as image_name
from geoswc.data.records import DRAFT_HEADROOM, Item, LoadReport, Record, make_views, parse_coord, worker_count
from geoswc.data.sources import names_remote

log = logging.getLogger(__name__)

SHARD_NAME = "shard-%06d.tar"
INDEX_NAME = "shards.json"
SHARDS_FORMAT = "geoswc-shards/1"
_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_FORMAT_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
    "HEIF": "heic",
    "MPO": "jpg",
}
_MAX_JSON_BYTES = 1 << 20
"""Largest ``.json`` member read; photos are bounded by :class:`~geoswc.data.images.ImageLimits`."""
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
"""WebDataset's sample grouping: ``dir/KEY.ext`` -> (``dir/KEY``, ``ext``)."""


# -- shard lists --------------------------------------------------------------------------------------

SAMPLES_PER_SHARD = 1000
"""Photos per shard that ``geoswc shards`` writes by default, and per :class:`PhotoShard` of a photo list."""


@dataclass(frozen=True)
class PhotoShard:
    """Photos of a list (a CSV or a folder) read as the shard ``geoswc shards`` would write of them: the same
    samples in the same order, keyed by their row numbers, so that training streams the same photos the same
    way whether they were packed or not (:func:`photo_shards`)."""

    records: tuple[Record, ...]
    first: int
    """The row number of the first photo (its sample key)."""

    @property
    def name(self) -> str:
        return f"photos {self.first}..{self.first + len(self.records) - 1}"


@dataclass(frozen=True)
class MemoryShard:
    """Photos handed to the Python API (paths, encoded bytes, PIL images, or the error reading one gave) read as
    a photo shard: keyed by their positions in the input (:func:`memory_shards`), named by ``names``."""

    sources: tuple[ImageSource | ImageError, ...]
    names: tuple[str, ...]
    first: int
    """The input position of the first photo."""

    @property
    def name(self) -> str:
        return f"photos {self.first}..{self.first + len(self.sources) - 1}"


Source = str | PhotoShard | MemoryShard
"""A shard of a stream: a local tar file, photos of a list, or photos handed over in memory."""


def memory_shards(sources: Sequence[ImageSource | ImageError], names: Sequence[str], per: int) -> list[MemoryShard]:
    """Photos as consecutive shards of ``per``: a DataLoader worker decodes whole shards, so with ``per`` the batch
    size each worker's batches hold consecutive photos, and input order is restored with a small buffer."""
    per = max(1, per)
    return [MemoryShard(tuple(sources[i : i + per]), tuple(names[i : i + per]), i) for i in range(0, len(sources), per)]


def photo_dataset(
    sources: Sequence[ImageSource | ImageError],
    pre: Preprocess,
    names: Sequence[str] | None = None,
    per: int = 16,
    limits: ImageLimits = DEFAULT_LIMITS,
    read_exif: bool = False,
) -> ShardDataset:
    """The one reader over photos handed over (paths, bytes, PIL images): :func:`memory_shards` of ``per`` (the
    batch size) read by :class:`ShardDataset` in this process's share (not split over torchrun ranks). Its keys
    map to input positions with :func:`input_position` of its ``shards``."""
    labels = list(names) if names is not None else [image_name(s) for s in sources]  # type: ignore[arg-type]
    shards = memory_shards(list(sources), labels, per)
    return ShardDataset(shards, pre, limits=limits, read_exif=read_exif, split_ranks=False)


def input_position(shards: Sequence[PhotoShard | MemoryShard], order: int) -> int:
    """The input position of the sample ``order`` (``ordinal << 32 | position in its shard``) of ``shards``."""
    return shards[order >> 32].first + (order & 0xFFFFFFFF)


def photo_shards(records: Sequence[Record], parts: int = 1) -> list[PhotoShard]:
    """A photo list as consecutive shards of :data:`SAMPLES_PER_SHARD` photos (fewer, so that there are at least
    ``parts`` shards when the photos allow: one a torchrun rank)."""
    per = max(1, min(SAMPLES_PER_SHARD, math.ceil(len(records) / max(1, parts))))
    return [PhotoShard(tuple(records[i : i + per]), i) for i in range(0, len(records), per)]


def shard_sources(spec: str | Path | Sequence[str | Path | PhotoShard]) -> list[Source]:
    """The shards of a stream: photo shards as they are, a shard spec resolved (:func:`resolve_shards`)."""
    if isinstance(spec, (str, Path)):
        return list(resolve_shards(spec))
    shards = list(spec)
    if shards and all(isinstance(s, PhotoShard) for s in shards):
        return shards  # type: ignore[return-value]
    if any(isinstance(s, PhotoShard) for s in shards):
        raise InputError("give photo shards or shard files, not both")
    return list(resolve_shards(shards))  # type: ignore[arg-type]


def source_name(src: Source) -> str:
    """What identifies a shard in a run's key: a tar file's name, or a digest of a photo shard's ids."""
    if isinstance(src, str):
        return Path(src).name
    return digest(*(src.names if isinstance(src, MemoryShard) else [r.image for r in src.records]))


def _index_of(folder: Path) -> dict[str, int]:
    """``{shard path: samples}`` from a folder's ``shards.json`` (empty when absent or unreadable).
    Entries must name files inside the folder."""
    path = folder / INDEX_NAME
    if not path.is_file():
        return {}
    try:
        meta = json_records.parse_json(path.read_text(encoding="utf-8"))
        listed = {str(s["url"]): int(s["nsamples"]) for s in meta.get("shardlist", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        log.warning("%s is unreadable (%s); ignoring it", path, e)
        return {}
    odd = [u for u in listed if Path(u).name != u or u in (".", "..")]
    if odd:
        raise InputError(
            f"{path} lists {odd[0]!r}, which is not a file name inside {folder}; shard lists name "
            "local files beside them"
        )
    return {str(folder / u): n for u, n in listed.items()}


def resolve_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """The shards a spec names, in order.

    Args:
        spec: a folder (the shards its ``shards.json`` lists, else its ``*.tar`` sorted), a glob
            (``data/shard-*.tar``), a brace pattern (``shard-{000000..000099}.tar``), one shard path, or a
            list of these. Shards are local files: URLs and ``pipe:`` commands are refused.

    Raises:
        InputError: the spec matches no shard, or names something other than local files.
    """
    if not isinstance(spec, (str, Path)):
        return [s for one in spec for s in resolve_shards(one)]
    text = str(spec)
    if names_remote(text):
        raise InputError(
            f"shards must be local files, not {text[:80]!r}: geoswc never runs commands or "
            "downloads shards; copy them to a local folder first"
        )
    path = Path(text)
    if path.is_dir():
        found = list(_index_of(path)) or sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise InputError(f"no shards (*.tar) in {path}")
        return found
    out: list[str] = []
    for pattern in _expand_braces(text):
        if glob.has_magic(pattern):
            out += sorted(glob.glob(pattern))
        elif Path(pattern).is_file():
            out.append(pattern)
        else:
            raise InputError(f"shard not found: {pattern}")
    if not out:
        raise InputError(f"no shards match {text}")
    return out


def _expand_braces(text: str) -> list[str]:
    """``::``-separated lists and ``{000000..000099}`` braces, as WebDataset writes shard sets."""
    return [u for part in text.split("::") for u in braceexpand(part)]


def shard_sizes(shards: Sequence[str]) -> list[int | None]:
    """Samples per shard from the ``shards.json`` beside them (None where not listed)."""
    known: dict[str, int] = {}
    for folder in {str(Path(s).parent) for s in shards}:
        known |= _index_of(Path(folder))
    return [known.get(s) for s in shards]


def listed_total(shards: Sequence[str]) -> int | None:
    """The samples of these shards by their ``shards.json`` (None when one is not listed): a progress total."""
    sizes = shard_sizes(shards)
    return None if None in sizes else sum(n or 0 for n in sizes)


def count_samples(shards: Sequence[Source]) -> int:
    """Total samples: a photo shard's photos; a tar file's from ``shards.json`` where listed, else by reading its
    headers."""
    tars = [s for s in shards if isinstance(s, str)]
    sizes = shard_sizes(tars)
    listed = sum(n if n is not None else sum(1 for _ in iter_shard(s, 0)) for s, n in zip(tars, sizes, strict=True))
    return listed + sum(len(s.records) for s in shards if isinstance(s, PhotoShard))


# -- writing ------------------------------------------------------------------------------------------


class _EncodedImages(torch.utils.data.Dataset):
    """``i -> (i, bytes | None, extension, error | None)``: a record's file, checked (decoded when ``verify``)."""

    def __init__(self, records: Sequence[Record], verify: bool, limits: ImageLimits) -> None:
        self.records, self.verify, self.limits = records, verify, limits

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, bytes | None, str, str | None]:
        path = self.records[i].path
        try:
            fmt = open_image(path, self.limits).format or ""
            if self.verify:
                load_image(path, self.limits)
            data = Path(path).read_bytes()
        except ImageError as e:
            return i, None, "", str(e)
        except OSError as e:
            return i, None, "", f"{path} cannot be read: {e.strerror or e}"
        ext = Path(path).suffix.lower().lstrip(".")
        return i, data, ext if ext in _EXTS else _FORMAT_EXT.get(fmt, "jpg"), None


def _identity(x: Any) -> Any:
    return x


def write_shards(
    records: Sequence[Record],
    out: str | Path,
    samples_per_shard: int = 1000,
    *,
    verify: bool = True,
    num_workers: int = 0,
    limits: ImageLimits = DEFAULT_LIMITS,
    progress: bool = True,
    source: str = "",
) -> tuple[list[Path], LoadReport]:
    """Pack photos and their positions into WebDataset shards ``out/shard-%06d.tar`` plus ``shards.json``.

    Each shard is written to a temporary file and renamed when complete, so a killed run never leaves a
    truncated shard under a shard's name. Photos that cannot be read (or, with ``verify``, decoded) are
    reported and skipped; the sample key stays the record's row number, so keys have gaps there.

    Args:
        records: photos with positions (from :func:`geoswc.data.records.load_records`).
        out: folder for the shards; must not hold shards already.
        samples_per_shard: photos per shard (the last one may hold fewer).
        verify: fully decode every photo first (slower; catches truncated files).
        num_workers: reading/verifying processes.
        source: where the records came from, recorded in ``shards.json``.

    Returns:
        The shard paths and the report of skipped photos.
    """
    if samples_per_shard < 1:
        raise InputError(f"samples per shard must be >= 1, got {samples_per_shard}")
    if not records:
        raise InputError("no photos to write into shards")
    out = artifact_folders.claim_folder(out, "shard set")
    existing = sorted(out.glob("shard-*.tar"))
    if existing:
        raise InputError(f"{out} already holds shards ({existing[0].name}, ...); write into an empty folder")
    report = LoadReport(f"{source or 'photos'} -> {out}", total=len(records))
    loader = torch.utils.data.DataLoader(
        _EncodedImages(records, verify, limits),
        batch_size=None,
        num_workers=worker_count(num_workers),
        collate_fn=_identity,
    )

    def good() -> Iterator[dict[str, Any]]:
        for i, data, ext, err in progress_bar(loader, total=len(records), desc="shards", unit="img", show=progress):
            r = records[i]
            if data is None:
                report.skip(r.image, str(err))
                continue
            meta = {"lat": r.lat, "lon": r.lon, "author": r.author, "image": r.image}
            yield {"__key__": f"{i:09d}", ext: data, "json": json.dumps(meta, ensure_ascii=False).encode()}

    written = _write_tars(good(), out, samples_per_shard)
    report.log()
    if not written:
        raise InputError(f"none of the {len(records)} photos could be read: {report.summary()}")
    atomic_files.write_json(
        out / INDEX_NAME,
        {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": out.name,
            "shardlist": [{"url": p.name, "nsamples": n, "filesize": p.stat().st_size} for p, n in written],
            "geoswc": {
                "format": SHARDS_FORMAT,
                "source": source,
                "samples": report.kept,
                "rows": report.total,
                "skipped": [{"image": item, "reason": why} for item, why in report.skipped[:1000]],
            },
        },
    )
    return [p for p, _ in written], report


def _write_tars(samples: Iterator[dict[str, Any]], out: Path, per_shard: int) -> list[tuple[Path, int]]:
    """Write ``samples`` into consecutive shards of ``per_shard``, each atomically; ``[(path, count)]``.
    Members are plain ustar entries (``KEY.ext``, mtime 0): 512 bytes of header each, no PAX record."""
    written: list[tuple[Path, int]] = []
    for first in samples:
        path, n = out / (SHARD_NAME % len(written)), 0
        with (
            atomic_files.atomic_writer(path) as f,
            tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tf,
        ):
            for sample in itertools.chain([first], itertools.islice(samples, per_shard - 1)):
                key = sample["__key__"]
                for ext, data in sample.items():
                    if ext != "__key__":
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mode = len(data), 0o444
                        tf.addfile(info, io.BytesIO(data))
                n += 1
        written.append((path, n))
    return written


# -- reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSample:
    """One photo read back from a shard."""

    image: str
    """The photo's id (the ``image`` of its JSON, else ``KEY.EXT``)."""
    lat: float
    lon: float
    author: str
    data: ImageSource
    """The encoded photo, as stored (a memory shard's: the source as handed over)."""
    ext: str
    key: str
    shard: str
    order: int
    """``shard ordinal << 32 | position in the shard``: sorting by it restores the shard set's order."""
    path: Path | None = None
    """The photo's file (a photo shard's sample), else None."""
    label: str | None = None
    """How messages name the photo (default: its file, else its id, shard and key)."""

    @property
    def index(self) -> int:
        """Stable per-photo number seeding its augmentations: the key when it is a number (our writer's
        row number, so a shard sample gets the same views as the folder's photo), else a hash of it."""
        return int(self.key) if self.key.isdigit() else int(digest(self.shard, self.key, length=15), 16)


@dataclass(frozen=True)
class SampleError:
    """A sample (or a whole shard) that could not be read."""

    label: str
    reason: str
    order: int
    kind: str | None = None
    """A memory shard's unreadable source: its :class:`~geoswc.core.errors.ImageError` kind (``reason`` is then
    the whole message)."""


@dataclass
class _Group:
    """The members of one sample as they are read: the ``.json`` and one image (bounded by the size limits),
    the other image extensions seen, and why the sample cannot be used (a member above its limit)."""

    key: str
    data: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None

    def add(self, tf: tarfile.TarFile, m: tarfile.TarInfo, ext: str, limits: ImageLimits) -> None:
        """Read member ``m`` if it is within its limit and the sample needs it (the declared size is checked
        before a byte is read; a second image is only noted: the sample is refused for it anyway)."""
        limit = _MAX_JSON_BYTES if ext == "json" else limits.max_bytes
        if m.issparse():
            self.problem = self.problem or f"member {m.name} is a sparse file (its map could expand it): refused"
            return
        if m.size > limit:
            self.problem = self.problem or f"member {m.name} declares {m.size} bytes, above the limit of {limit}"
            return
        if ext in _EXTS and any(e in _EXTS for e in self.data):
            self.data[ext] = b""
            return
        f = tf.extractfile(m)
        data = f.read() if f is not None else b""
        if len(data) != m.size:
            raise tarfile.ReadError(f"member {m.name} is cut short ({len(data)} of {m.size} bytes)")
        self.data[ext] = data

    def sample(self, shard: str, order: int) -> ShardSample | SampleError:
        """The sample these members make, or why they make none."""
        label = f"{shard}#{self.key}"
        if self.problem:
            return SampleError(label, self.problem, order)
        group = self.data
        if "json" not in group:
            return SampleError(label, "no .json member (lat, lon, author)", order)
        images = [e for e in group if e in _EXTS]
        if len(images) != 1:
            return SampleError(label, "no image member" if not images else f"several image members {images}", order)
        try:
            meta = json_records.parse_json(group["json"])  # bounded: 1 MiB; nesting ends in RecursionError
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            lat = parse_coord(None if meta.get("lat") is None else str(meta["lat"]), "lat", 90.0)
            lon = parse_coord(None if meta.get("lon") is None else str(meta["lon"]), "lon", 180.0)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return SampleError(label, f"bad .json: {str(e)[:200] or type(e).__name__}", order)
        ext = images[0]
        image = str(meta.get("image") or f"{self.key}.{ext}")
        return ShardSample(
            image, lat, lon, str(meta.get("author") or "")[:1000], group[ext], ext, self.key, shard, order
        )


_EXTENDED_HEADERS = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_MAX_HEADER_BYTES = 1 << 16


class _BoundedTarInfo(tarfile.TarInfo):
    """Tar headers whose extended records (long names, PAX headers) are refused above 64 KiB before Python's
    tarfile reads them whole into memory."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        f = tarfile_.fileobj
        start = f.tell()
        head = cls.frombuf(f.read(tarfile.BLOCKSIZE), tarfile_.encoding, tarfile_.errors)
        if head.type in _EXTENDED_HEADERS and head.size > _MAX_HEADER_BYTES:
            raise tarfile.ReadError(
                f"an extended tar header declares {head.size} bytes, above the limit of {_MAX_HEADER_BYTES}"
            )
        f.seek(start)
        return super().fromtarfile(tarfile_)


def _members(tf: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """``(key, extension, member)`` of a tar's regular members that a sample uses (``.json`` and images);
    nothing is read here."""
    for m in tf:
        parts = _KEY_EXT.match(m.name)
        if parts is None or not m.isreg():
            continue
        ext = parts.group(2).lower()
        if ext == "json" or ext in _EXTS:
            yield parts.group(1), ext, m


def iter_shard(url: str, ordinal: int, limits: ImageLimits = DEFAULT_LIMITS) -> Iterator[ShardSample | SampleError]:
    """The samples of one local shard, member by member: a sample with a member above the size limits is
    reported and skipped before it is read; a damaged shard ends with a :class:`SampleError`."""
    pos = 0
    group: _Group | None = None
    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:", tarinfo=_BoundedTarInfo) as tf:
            for key, ext, m in _members(tf):
                if group is None or key != group.key:
                    if group is not None:
                        yield group.sample(url, ordinal << 32 | pos)
                        pos += 1
                    group = _Group(key)
                group.add(tf, m, ext, limits)
        if group is not None:
            yield group.sample(url, ordinal << 32 | pos)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        last = group.sample(url, ordinal << 32 | pos) if group is not None else None
        if isinstance(last, ShardSample) or (group is not None and group.problem):  # complete, or refused: say why
            yield last
            pos += 1
        yield SampleError(url, f"shard unreadable or truncated after {pos} samples: {e}", ordinal << 32 | 0xFFFFFFFF)


def iter_photos(
    shard: PhotoShard, ordinal: int, limits: ImageLimits = DEFAULT_LIMITS
) -> Iterator[ShardSample | SampleError]:
    """The samples of a photo shard, as :func:`iter_shard` reads those of the tar ``geoswc shards`` writes of
    them: each photo's file as stored, a file above the size limits reported and skipped before it is read."""
    for pos, r in enumerate(shard.records):
        key, order = f"{shard.first + pos:09d}", ordinal << 32 | pos
        try:
            data = read_image_file(r.path, limits)
        except ImageError as e:
            yield SampleError(r.image, str(e), order)
            continue
        ext = Path(r.path).suffix.lower().lstrip(".")
        yield ShardSample(r.image, r.lat, r.lon, r.author, data, ext, key, shard.name, order, Path(r.path))


def iter_memory(shard: MemoryShard, ordinal: int) -> Iterator[ShardSample | SampleError]:
    """The samples of a memory shard: each source as it is (decoded by the dataset, which checks its limits),
    a source that could not be read as its error."""
    for pos, (src, name) in enumerate(zip(shard.sources, shard.names, strict=True)):
        order = ordinal << 32 | pos
        if isinstance(src, ImageError):
            yield SampleError(name, str(src), order, src.kind)
            continue
        path = Path(src) if isinstance(src, (str, os.PathLike)) else None
        ext = path.suffix.lower().lstrip(".") if path is not None else ""
        key = f"{shard.first + pos:09d}"
        yield ShardSample(name, math.nan, math.nan, "", src, ext, key, shard.name, order, path, label=name)


def iter_source(src: Source, ordinal: int, limits: ImageLimits = DEFAULT_LIMITS) -> Iterator[ShardSample | SampleError]:
    """The samples of a tar shard, a photo shard or a memory shard."""
    if isinstance(src, str):
        return iter_shard(src, ordinal, limits)
    return iter_memory(src, ordinal) if isinstance(src, MemoryShard) else iter_photos(src, ordinal, limits)


def iter_samples(shards: str | Path | Sequence[str | Path], report: LoadReport | None = None) -> Iterator[ShardSample]:
    """Every readable sample of the shards, in order; bad samples and shards go to ``report`` (and the log)."""
    for ordinal, url in enumerate(resolve_shards(shards)):
        for s in iter_shard(url, ordinal):
            if report is not None:
                report.total += 1
            if isinstance(s, SampleError):
                log.warning("%s: %s", s.label, s.reason)
                if report is not None:
                    report.skip(s.label, s.reason)
                continue
            yield s


# -- the streaming dataset ----------------------------------------------------------------------------


def _sample_error(s: SampleError) -> Exception:
    """The error a bad sample stands for: an unreadable handed-over source keeps its kind and message."""
    if s.kind is not None:
        return ImageError(s.reason, kind=s.kind)
    return InputError(f"{s.label}: {s.reason}")


def decode_source(source: ImageSource, limits: ImageLimits, draft_size: int, name: str) -> Image.Image:
    """A sample's RGB image: encoded data or a file decoded by :func:`~geoswc.data.images.load_image`; a PIL
    image handed over taken as it is (bounded and converted to RGB, not re-oriented).

    Raises:
        ImageError: naming ``name``.
    """
    if not isinstance(source, Image.Image):
        return load_image(source, limits, draft_size=draft_size, name=name)
    check_size(source, name, limits)  # no pixels, or a pixel bomb
    try:
        return source if source.mode == "RGB" else source.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{name} (mode {source.mode}) cannot be converted to RGB: {e}") from e


@dataclass(frozen=True)
class SampleMeta:
    """What a batch carries about each photo besides its pixels."""

    image: str
    lat: float
    lon: float
    author: str
    gps: tuple[float, float] | None = None
    """The photo's own GPS EXIF (only when the dataset was asked to read it)."""
    path: Path | None = None
    """The photo's file, when it was read from one (a photo shard)."""


@dataclass(eq=False)
class ShardDataset(torch.utils.data.IterableDataset):
    """Decoded, preprocessed photos streamed from shards: items ``(order, tensor | None, error | None, meta)``
    (see :func:`geoswc.data.records.collate`).

    Shards are split across the ranks of a torchrun job and then across DataLoader workers by WebDataset's
    ``split_by_node`` and ``split_by_worker``, so each shard is read once per pass. The tensor is
    ``(3, S, S)``, or ``(V, 3, S, S)`` with ``views > 1`` (plain first, then augmentations seeded by the
    photo's :attr:`ShardSample.index`).
    """

    shards: Sequence[Source]
    """Shard paths (see :func:`resolve_shards`), or photo shards (:func:`photo_shards`)."""
    pre: Preprocess
    views: int = 1
    seed: int = 0
    limits: ImageLimits = DEFAULT_LIMITS
    train_augment: bool = False
    """Random training views (seeded by ``(seed, epoch, index)``) instead of the plain view."""
    shuffle_buffer: int = 0
    """>0: shuffle the shard order each epoch and the samples through a buffer of this many (training)."""
    repeat: bool = False
    """Cycle over the shards forever (training takes a fixed number of steps per epoch)."""
    read_exif: bool = False
    """Put each photo's GPS EXIF in its meta."""
    split_ranks: bool = True
    """Split the shards across torchrun ranks."""
    epoch: int = field(default=0, init=False)

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling and augmentation (call before iterating each epoch)."""
        self.epoch = epoch

    def _rng(self, *parts: int) -> random.Random:
        return random.Random(int(digest(repr((self.seed, self.epoch, *parts)), length=15), 16))

    def _pass(self, cycle: int) -> Iterator[ShardSample | SampleError]:
        """One pass over this rank's and worker's shards."""
        shards: Iterator[tuple[int, str]] = iter(list(enumerate(self.shards)))
        if self.shuffle_buffer > 0:
            shards = wds.shuffle(len(self.shards), initial=len(self.shards), rng=self._rng(cycle))(shards)
        if self.split_ranks:
            shards = wds.split_by_node(shards)
        samples = (s for ordinal, src in wds.split_by_worker(shards) for s in iter_source(src, ordinal, self.limits))
        if self.shuffle_buffer > 1:
            info = torch.utils.data.get_worker_info()
            rng = self._rng(cycle, distributed.rank() if self.split_ranks else 0, info.id if info is not None else 0)
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples

    def __iter__(self) -> Iterator[Item]:
        for cycle in itertools.count():
            empty = True
            for s in self._pass(cycle):
                empty = False
                yield self._prepare(s)
            if not self.repeat or empty:
                return

    def _prepare(self, s: ShardSample | SampleError) -> Item:
        if isinstance(s, SampleError):
            return s.order, None, _sample_error(s), SampleMeta(s.label, math.nan, math.nan, "")
        meta = SampleMeta(s.image, s.lat, s.lon, s.author, path=s.path)
        label = s.label or (str(s.path) if s.path is not None else f"{s.image} ({Path(s.shard).name}#{s.key})")
        try:
            img = decode_source(s.data, self.limits, self.pre.image_size * DRAFT_HEADROOM, label)
            x = make_views(
                img,
                self.pre,
                s.index,
                views=self.views,
                seed=self.seed,
                train_augment=self.train_augment,
                epoch=self.epoch,
            )
        except ImageError as e:
            return s.order, None, e, meta
        except Exception as e:  # noqa: BLE001 - whatever one sample does, the stream goes on without it
            return s.order, None, ImageError(f"{label} cannot be processed ({type(e).__name__}: {e})"), meta
        if self.read_exif and not isinstance(s.data, Image.Image):
            try:
                meta = SampleMeta(s.image, s.lat, s.lon, s.author, read_gps(s.data, self.limits, label), s.path)
            except Exception:  # noqa: BLE001, S110 - the photo's own position is a courtesy: never worth failing it
                pass
        return s.order, x, None, meta


def sample_positions(metas: Sequence[SampleMeta]) -> tuple[np.ndarray, np.ndarray]:
    """``(lat, lon)`` arrays ``(b,)`` of a batch's samples."""
    return np.array([m.lat for m in metas], np.float64), np.array([m.lon for m in metas], np.float64)
