"""WebDataset tar shards of geotagged photos: written from a CSV + image folder, streamed back.

A shard ``shard-000000.tar`` holds, for each sample ``KEY`` (the photo's row number, ``%09d``), the encoded
photo ``KEY.jpg`` (or ``.png``, ``.webp``, ...) as it was on disk and ``KEY.json`` =
``{"lat", "lon", "author", "image"}`` (``image``: the photo's id, its name in the CSV). ``shards.json``
beside the shards lists them with their sample counts (webdataset's ``wids`` shard-index format).

Reading streams one shard at a time (nothing is held beyond a shuffle buffer); any WebDataset shard set
with an image and such a ``.json`` per sample works. Bad samples and unreadable shards are reported and
skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import math
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, storage
from .config import Preprocess, digest
from .data import DRAFT_HEADROOM, LoadReport, Record, _parse_coord, make_views
from .errors import ImageError, InputError
from .images import DEFAULT_LIMITS, ImageLimits, _open_raw, load_image, read_gps

log = logging.getLogger(__name__)

SHARD_NAME = "shard-%06d.tar"
INDEX_NAME = "shards.json"
SHARDS_FORMAT = "geoswc-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic", "heif")
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff",
               "HEIF": "heic", "MPO": "jpg"}


# -- shard lists --------------------------------------------------------------------------------------


def _index_of(folder: Path) -> dict[str, int]:
    """``{shard path: samples}`` from a folder's ``shards.json`` (empty when absent or unreadable)."""
    path = folder / INDEX_NAME
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return {str(folder / s["url"]): int(s["nsamples"]) for s in meta.get("shardlist", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s); ignoring it", path, e)
        return {}


def resolve_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """The shards a spec names, in order.

    Args:
        spec: a folder (the shards its ``shards.json`` lists, else its ``*.tar`` sorted), a glob
            (``data/shard-*.tar``), a brace pattern (``shard-{000000..000099}.tar``), one shard path or
            ``pipe:``/``http`` URL, or a list of these.

    Raises:
        InputError: the spec matches no shard.
    """
    if not isinstance(spec, (str, Path)):
        return [s for one in spec for s in resolve_shards(one)]
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        listed = list(_index_of(path))
        found = listed or sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise InputError(f"no shards (*.tar) in {path}")
        return found
    if "://" in text or text.startswith("pipe:"):
        return _braces(text)
    out: list[str] = []
    for pattern in _braces(text):
        if glob.has_magic(pattern):
            out += sorted(glob.glob(pattern))
        elif Path(pattern).is_file():
            out.append(pattern)
        else:
            raise InputError(f"shard not found: {pattern}")
    if not out:
        raise InputError(f"no shards match {text}")
    return out


def _braces(text: str) -> list[str]:
    """WebDataset URL expansion: ``::``-separated lists and ``{000000..000099}`` braces."""
    if "{" not in text and "::" not in text:
        return [text]
    from webdataset.shardlists import expand_urls

    return list(expand_urls(text))


def shard_sizes(shards: Sequence[str]) -> list[int | None]:
    """Samples per shard from the ``shards.json`` beside them (None where not listed)."""
    known: dict[str, int] = {}
    for folder in {str(Path(s).parent) for s in shards if "://" not in s and not s.startswith("pipe:")}:
        known |= _index_of(Path(folder))
    return [known.get(s) for s in shards]


def count_samples(shards: Sequence[str]) -> int:
    """Total samples: from ``shards.json`` where listed, else by reading the shard's tar headers."""
    total = 0
    for s, n in zip(shards, shard_sizes(shards), strict=True):
        if n is None:
            n = sum(1 for _ in _iter_shard(s, 0))
        total += n
    return total


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
            img = _open_raw(path, self.limits)
            fmt = img.format or ""
            if self.verify:
                load_image(path, self.limits)
            data = Path(path).read_bytes()
        except ImageError as e:
            return i, None, "", str(e)
        except OSError as e:
            return i, None, "", f"{path} cannot be read: {e.strerror or e}"
        ext = Path(path).suffix.lower().lstrip(".")
        return i, data, ext if ext in IMAGE_EXTS else _FORMAT_EXT.get(fmt, "jpg"), None


def _identity(x: Any) -> Any:
    return x


def write_shards(records: Sequence[Record], out: str | Path, samples_per_shard: int = 1000, *,
                 verify: bool = True, num_workers: int = 0, limits: ImageLimits = DEFAULT_LIMITS,
                 progress: bool = True, source: str = "") -> tuple[list[Path], LoadReport]:
    """Pack photos and their positions into WebDataset shards ``out/shard-%06d.tar`` plus ``shards.json``.

    Each shard is written to a temporary file and renamed when complete, so a killed run never leaves a
    truncated shard under a shard's name. Photos that cannot be read (or, with ``verify``, decoded) are
    reported and skipped; the sample key stays the record's row number, so keys have gaps there.

    Args:
        records: photos with positions (from :func:`geoswc.data.load_records`).
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("shard-*.tar"))
    if existing:
        raise InputError(f"{out} already holds shards ({existing[0].name}, ...); write into an empty folder")
    from webdataset import TarWriter

    report = LoadReport(f"{source or 'photos'} -> {out}", total=len(records))
    loader = torch.utils.data.DataLoader(_EncodedImages(records, verify, limits), batch_size=None,
                                         num_workers=num_workers, collate_fn=_identity)

    def good() -> Iterator[dict[str, Any]]:
        for i, data, ext, err in tqdm(loader, total=len(records), desc="shards", unit="img", disable=not progress):
            r = records[i]
            if data is None:
                report.skip(r.image, str(err))
                continue
            meta = {"lat": r.lat, "lon": r.lon, "author": r.author, "image": r.image}
            yield {"__key__": f"{i:09d}", ext: data, "json": json.dumps(meta, ensure_ascii=False).encode()}

    samples = good()
    written: list[tuple[Path, int]] = []
    for first in samples:
        path = out / (SHARD_NAME % len(written))
        n = 0
        with storage.atomic_writer(path) as f:
            tw = TarWriter(f, encoder=False, mtime=0.0)
            for sample in itertools.chain([first], itertools.islice(samples, samples_per_shard - 1)):
                tw.write(sample)
                n += 1
            tw.close()
        written.append((path, n))
    report.log()
    if not written:
        raise InputError(f"none of the {len(records)} photos could be read: {report.summary()}")
    storage.write_json(out / INDEX_NAME, {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": out.name,
        "shardlist": [{"url": p.name, "nsamples": n, "filesize": p.stat().st_size} for p, n in written],
        "geoswc": {"format": SHARDS_FORMAT, "source": source, "samples": report.kept, "rows": report.total,
                   "skipped": [{"image": item, "reason": why} for item, why in report.skipped[:1000]]},
    })
    return [p for p, _ in written], report


# -- reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSample:
    """One photo read back from a shard."""

    image: str
    """The photo's id (the ``image`` of its JSON, else ``KEY.EXT``)."""
    lat: float
    lon: float
    author: str
    data: bytes
    """The encoded photo, as stored."""
    ext: str
    key: str
    shard: str
    order: int
    """``shard ordinal << 32 | position in the shard``: sorting by it restores the shard set's order."""

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


def _to_sample(group: dict[str, bytes], key: str, shard: str, order: int) -> ShardSample | SampleError:
    label = f"{shard}#{key}"
    if "json" not in group:
        return SampleError(label, "no .json member (lat, lon, author)", order)
    images = [e for e in group if e in IMAGE_EXTS]
    if len(images) != 1:
        return SampleError(label, "no image member" if not images else f"several image members {images}", order)
    try:
        meta = json.loads(group["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        lat = _parse_coord(None if meta.get("lat") is None else str(meta["lat"]), "lat", 90.0)
        lon = _parse_coord(None if meta.get("lon") is None else str(meta["lon"]), "lon", 180.0)
    except (ValueError, UnicodeDecodeError) as e:
        return SampleError(label, f"bad .json: {e}", order)
    ext = images[0]
    image = str(meta.get("image") or f"{key}.{ext}")
    return ShardSample(image, lat, lon, str(meta.get("author") or ""), group[ext], ext, key, shard, order)


def _iter_shard(url: str, ordinal: int) -> Iterator[ShardSample | SampleError]:
    """The samples of one shard, streaming; a damaged shard ends with a :class:`SampleError`."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    pos = 0
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with contextlib.closing(gopen(url, "rb")) as stream:
            for member in tar_file_iterator(stream):
                prefix, suffix = base_plus_ext(member["fname"])
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        yield _to_sample(group, key, url, ordinal << 32 | pos)
                        pos += 1
                    key, group = prefix, {}
                group[suffix.lower()] = member["data"]
        if key is not None:
            yield _to_sample(group, key, url, ordinal << 32 | pos)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        yield SampleError(url, f"shard unreadable or truncated after {pos} samples: {e}", ordinal << 32 | 0xFFFFFFFF)


def iter_samples(shards: str | Path | Sequence[str | Path], report: LoadReport | None = None) -> Iterator[ShardSample]:
    """Every readable sample of the shards, in order; bad samples and shards go to ``report`` (and the log)."""
    urls = resolve_shards(shards)
    for ordinal, url in enumerate(urls):
        for s in _iter_shard(url, ordinal):
            if report is not None:
                report.total += 1
            if isinstance(s, SampleError):
                log.warning("%s: %s", s.label, s.reason)
                if report is not None:
                    report.skip(s.label, s.reason)
                continue
            yield s


# -- the streaming dataset ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleMeta:
    """What a batch carries about each photo besides its pixels."""

    image: str
    lat: float
    lon: float
    author: str
    gps: tuple[float, float] | None = None
    """The photo's own GPS EXIF (only when the dataset was asked to read it)."""


SampleItem = tuple[int, torch.Tensor | None, Exception | None, SampleMeta]


class ShardDataset(torch.utils.data.IterableDataset):
    """Decoded, preprocessed photos streamed from shards: items ``(order, tensor | None, error | None, meta)``.

    Shards are split round-robin across the ranks of a torchrun job (the context when the dataset is
    made) and then across DataLoader workers, so each shard is read once per pass. The tensor is
    ``(3, S, S)``, or ``(V, 3, S, S)`` with ``views > 1`` (plain first, then augmentations seeded by the
    photo's :attr:`ShardSample.index`, as :class:`~geoswc.data.ImageDataset` does).

    Args:
        shards: shard paths/URLs (see :func:`resolve_shards`).
        pre: preprocessing of the backbone.
        views: tensors per photo.
        train_augment: random training views (seeded by ``(seed, epoch, index)``) instead.
        shuffle: per-epoch shard order and a ``shuffle_buffer``-sample buffer (training).
        repeat: cycle over the shards forever (training takes a fixed number of steps per epoch).
        read_exif: put each photo's GPS EXIF in its meta.
        split_ranks: split the shards across torchrun ranks.
    """

    def __init__(self, shards: Sequence[str], pre: Preprocess, *, views: int = 1, seed: int = 0,
                 limits: ImageLimits = DEFAULT_LIMITS, train_augment: bool = False, shuffle: bool = False,
                 shuffle_buffer: int = 1000, repeat: bool = False, read_exif: bool = False,
                 split_ranks: bool = True) -> None:
        super().__init__()
        self.shards = list(shards)
        self.pre, self.views, self.seed, self.limits = pre, views, seed, limits
        self.train_augment, self.read_exif = train_augment, read_exif
        self.shuffle, self.shuffle_buffer, self.repeat = shuffle, shuffle_buffer, repeat
        ctx = distributed.context()
        self.rank, self.world_size = (ctx.rank, ctx.world_size) if split_ranks else (0, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling and augmentation (call before iterating each epoch)."""
        self.epoch = epoch

    def assigned(self, cycle: int = 0, worker: int = 0, workers: int = 1) -> list[tuple[int, str]]:
        """``(ordinal, shard)`` pairs one rank's worker reads in a pass."""
        order = list(enumerate(self.shards))
        if self.shuffle:
            perm = np.random.default_rng((self.seed, self.epoch, cycle)).permutation(len(order))
            order = [order[i] for i in perm]
        return order[self.rank::self.world_size][worker::workers]

    def __iter__(self) -> Iterator[SampleItem]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for cycle in itertools.count():
            mine = self.assigned(cycle, worker, workers)
            if not mine:
                return
            stream: Iterator[ShardSample | SampleError] = (
                s for ordinal, url in mine for s in _iter_shard(url, ordinal))
            if self.shuffle and self.shuffle_buffer > 1:
                rng = np.random.default_rng((self.seed, self.epoch, cycle, self.rank, worker))
                stream = _shuffled(stream, self.shuffle_buffer, rng)
            for s in stream:
                yield self._prepare(s)
            if not self.repeat:
                return

    def _prepare(self, s: ShardSample | SampleError) -> SampleItem:
        if isinstance(s, SampleError):
            return s.order, None, InputError(f"{s.label}: {s.reason}"), SampleMeta(s.label, math.nan, math.nan, "")
        meta = SampleMeta(s.image, s.lat, s.lon, s.author)
        label = f"{s.image} ({Path(s.shard).name}#{s.key})"
        try:
            img = load_image(s.data, self.limits, draft_size=self.pre.image_size * DRAFT_HEADROOM)
            x = make_views(img, self.pre, s.index, views=self.views, seed=self.seed,
                           train_augment=self.train_augment, epoch=self.epoch)
        except ImageError as e:
            return s.order, None, ImageError(str(e).replace("<uploaded image>", label), e.kind), meta
        if self.read_exif:
            try:
                meta = SampleMeta(s.image, s.lat, s.lon, s.author, read_gps(s.data, self.limits))
            except ImageError:
                pass
        return s.order, x, None, meta


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Approximate shuffle with a ``size``-item buffer."""
    buf: list[Any] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = it
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


def collate_samples(items: Sequence[SampleItem]):
    """Batch the good items of a :class:`ShardDataset`.

    Returns:
        ``(orders (b,), images (b, ...) or None, metas [b], bad [(order, meta, error)])``.
    """
    good = [(o, x, m) for o, x, _, m in items if x is not None]
    bad = [(o, m, e) for o, x, e, m in items if x is None]
    orders = torch.tensor([o for o, _, _ in good], dtype=torch.long)
    x = torch.stack([t for _, t, _ in good]) if good else None
    return orders, x, [m for _, _, m in good], bad

