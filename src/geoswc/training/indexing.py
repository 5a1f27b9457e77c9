"""Building a model's gallery index: its photos embedded by the RRM, grouped by the model's cells and written by
:class:`~geoswc.gallery.files.GalleryWriter` chunk by chunk (the gallery is never whole in memory), from a
feature cache or from photos run through the model's backbone."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from geoswc.core.config import GalleryCodes
from geoswc.core.progress import progress_bar
from geoswc.data.records import Record
from geoswc.gallery.files import GalleryWriter
from geoswc.gallery.thumbnails import ThumbnailSettings, thumbnail_stream, thumbnails_of
from geoswc.models.geomodel import GeoModel
from geoswc.training.features import Extraction, Extractor, FeatureSet, stream_features

CHUNK = 1 << 14
"""Photos of a feature cache embedded and written at a time."""


@dataclass(frozen=True)
class GalleryPhotos:
    """The photos of a gallery: a feature cache made with the model's backbone (with ``images``, the folder its
    image ids are under, for thumbnails), or geotagged photos (``records``) or shards to run the backbone on."""

    features: FeatureSet | None = None
    images: Path | None = None
    records: Sequence[Record] | None = None
    shards: str | None = None


def build_index(
    model: GeoModel,
    out: Path,
    photos: GalleryPhotos,
    codes: GalleryCodes = GalleryCodes(),
    thumbnails: ThumbnailSettings | None = None,
    how: Extraction = Extraction(),
) -> None:
    """Write the gallery index of ``photos`` into ``out`` (with a thumbnail of each photo when ``thumbnails`` is
    given); ``how`` sets the batch size and the decoding processes (of the photos and of the thumbnails). A
    feature cache must come from the model's backbone (:func:`geoswc.models.compat.check`). An index already in
    ``out`` stays as it was, loadable, until the new one is complete; then the new one replaces it whole (the
    writer builds it beside ``out``: :class:`~geoswc.gallery.files.GalleryWriter`), so a build that fails or is
    killed never leaves ``out`` without a whole index."""
    with GalleryWriter(out, model.config.backbone.feature_dim, model.gallery_identity, codes, thumbnails) as w:

        def add(
            feats: Any,
            lat: ArrayLike,
            lon: ArrayLike,
            metas: tuple[Sequence[str], Sequence[str]],
            jpegs: list[bytes | None] | None,
        ) -> None:
            lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
            w.add(model.embed(feats), lat, lon, model.cells.assign(lat, lon), metas[0], metas[1], jpegs)

        if photos.features is not None:
            _add_cached(photos.features, photos.images, thumbnails, how, add)
        else:
            _add_decoded(model, photos, thumbnails, how, add)
        w.finish()


def _add_cached(
    fs: FeatureSet, images: Path | None, thumbs: ThumbnailSettings | None, how: Extraction, add: Any
) -> None:
    """A feature cache, chunk by chunk; thumbnails are made by ``how.workers`` processes, in row order, while the
    chunks are written."""
    made: Iterator[bytes | None] | None = None
    if thumbs is not None and images is not None:
        made = thumbnail_stream(Path(images), fs.names, thumbs, how.workers)
    for s in progress_bar(range(0, len(fs), CHUNK), desc="index", unit="chunk", show=len(fs) > CHUNK):
        e = min(s + CHUNK, len(fs))
        jpegs = [next(made) for _ in range(s, e)] if made is not None else None
        add(fs.features[s:e, 0], fs.lat[s:e], fs.lon[s:e], (fs.names[s:e], fs.authors[s:e]), jpegs)


def _add_decoded(
    model: GeoModel, photos: GalleryPhotos, thumbs: ThumbnailSettings | None, how: Extraction, add: Any
) -> None:
    """Photos, each batch embedded as the backbone computes it."""
    ex = Extractor(model.backbone, model.config.backbone, model.backbone_fingerprint)  # type: ignore[arg-type]

    def batch(_: Any, feats: Any, metas: Sequence[Any]) -> None:
        names = [x.image for x in metas]
        jpegs = None if thumbs is None else thumbnails_of([getattr(x, "path", None) for x in metas], names, thumbs)
        add(feats[:, 0], [x.lat for x in metas], [x.lon for x in metas], (names, [x.author for x in metas]), jpegs)

    stream_features(ex, batch, records=photos.records, shards=photos.shards, how=how)
