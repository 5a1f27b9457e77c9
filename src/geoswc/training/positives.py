"""Contrastive positives drawn on the fly, in memory linear in the number of photos.

Photos are hashed into a 3-D grid of cubes whose side is the positive radius, over their positions on a sphere
of the Earth's radius: every photo within ``positive_km`` of a photo lies in its cube or one of the 26 around it.
A partner is drawn uniformly from those cubes and kept when it really is a positive (near enough, another photo,
by another photographer unless that is allowed); after ``tries`` misses the photo has none this time. Given
success, the partner is uniform over the photo's positives, as a draw from the full list of positive pairs would
be, but that list (which grows with the square of the photos in a dense place) is never built.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from geoswc.core.errors import building
from geoswc.core.sphere import EARTH_RADIUS_KM, haversine_km, latlon_to_xyz

_MIN_SIDE_KM = 0.01
"""The smallest cube side: a radius below it (0 included) still finds its positives, in larger cubes."""
_CHUNK = 1 << 16
"""Anchors sampled at a time (bounds the ``(chunk, 27)`` lookup arrays to a few MiB)."""


class PositiveSampler:
    """Draws, for anchor photos, one geographic positive each (or none).

    Args:
        lat, lon: the photos' positions ``(N,)``, in degrees.
        authors: author id per photo ``(N,)`` (-1: unknown, never matched).
        positive_km: the positive radius.
        same_author_positives: let a photo of the same author be a positive.
        tries: draws per anchor before it is given no positive.
    """

    def __init__(
        self,
        lat: ArrayLike,
        lon: ArrayLike,
        authors: ArrayLike,
        positive_km: float,
        same_author_positives: bool = False,
        tries: int = 16,
    ) -> None:
        self.lat, self.lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        self.authors = np.asarray(authors, np.int64)
        self.r_km, self.same_author, self.tries = float(positive_km), same_author_positives, tries
        self.scale = EARTH_RADIUS_KM / max(self.r_km, _MIN_SIDE_KM)
        self.width = 2 * (int(self.scale) + 2) + 1  # cube coordinates lie in -scale-1 .. scale+1
        with building(f"the contrastive positives' grid of {len(self.lat):,} photos"):
            keys = self._keys(np.arange(len(self.lat)))
            self.order = np.argsort(keys, kind="stable")
            self.cube_keys, self.cube_start, self.cube_count = np.unique(
                keys[self.order], return_index=True, return_counts=True
            )
        w = self.width
        self.offsets = np.array(
            [(dx * w + dy) * w + dz for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)], np.int64
        )

    def _keys(self, rows: NDArray[np.int64]) -> NDArray[np.int64]:
        """The cube of each photo of ``rows``, as one int64 key."""
        c = np.floor(latlon_to_xyz(self.lat[rows], self.lon[rows]) * self.scale).astype(np.int64) + self.width // 2
        return (c[:, 0] * self.width + c[:, 1]) * self.width + c[:, 2]

    def sample(self, anchors: ArrayLike, rng: np.random.Generator) -> NDArray[np.int64]:
        """One positive per anchor ``(A,)``, -1 where none was found; the draws come from ``rng``."""
        anchors = np.asarray(anchors, np.int64)
        out = np.full(len(anchors), -1, np.int64)
        for s in range(0, len(anchors), _CHUNK):
            out[s : s + _CHUNK] = self._sample_chunk(anchors[s : s + _CHUNK], rng)
        return out

    def _sample_chunk(self, a: NDArray[np.int64], rng: np.random.Generator) -> NDArray[np.int64]:
        near = self._keys(a)[:, None] + self.offsets[None, :]  # (A, 27) the cubes around each anchor
        at = np.searchsorted(self.cube_keys, near).clip(0, max(len(self.cube_keys) - 1, 0))
        found = self.cube_keys[at] == near
        count = np.where(found, self.cube_count[at], 0)
        start = np.where(found, self.cube_start[at], 0)
        ends = count.cumsum(1)
        total = ends[:, -1]
        out = np.full(len(a), -1, np.int64)
        todo = np.nonzero(total > 1)[0]  # the anchor's own cube holds the anchor
        for _ in range(self.tries):
            if not len(todo):
                break
            u = (rng.random(len(todo)) * total[todo]).astype(np.int64)
            cube = (u[:, None] >= ends[todo]).sum(1)
            first = ends[todo, cube] - count[todo, cube]
            cand = self.order[start[todo, cube] + u - first]
            ok = self._is_positive(a[todo], cand)
            out[todo[ok]] = cand[ok]
            todo = todo[~ok]
        return out

    def _is_positive(self, a: NDArray[np.int64], b: NDArray[np.int64]) -> NDArray[np.bool_]:
        ok = (a != b) & (haversine_km(self.lat[a], self.lon[a], self.lat[b], self.lon[b]) <= self.r_km)
        if not self.same_author:
            ok &= ~((self.authors[a] == self.authors[b]) & (self.authors[a] >= 0))
        return ok
