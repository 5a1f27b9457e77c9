"""Adaptive S2 cell partition of the Earth (PlaNet / GeoEstimation), saved as a small CSV."""

from __future__ import annotations

import csv
import dataclasses
import heapq
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import s2sphere
from numpy.typing import ArrayLike, NDArray

from geoswc.core import atomic_files, json_records
from geoswc.core.config import CellConfig, ModelConfig, digest, from_dict, to_dict
from geoswc.core.errors import ArtifactError, InputError, ModelMismatchError
from geoswc.core.progress import progress_bar
from geoswc.core.sphere import haversine_km, latlon_to_xyz, spherical_mean, validate_latlon, xyz_to_latlon

log = logging.getLogger(__name__)

CSV_HEADER = ["token", "level", "lat", "lon", "count", "spread_km"]

FEW_CELLS = 20
"""A partition of fewer cells than this is too coarse for the classifier (``geoswc cells`` warns)."""
POINTS_PER_MAX = 50
"""Thresholds that fit ``N`` coordinates: ``max_per_cell`` about ``N / POINTS_PER_MAX``, ..."""
MAX_PER_MIN = 20
"""... and ``min_per_cell`` about ``max_per_cell / MAX_PER_MIN``."""


def fitting_thresholds(points: int) -> tuple[int, int]:
    """``(max_per_cell, min_per_cell)`` that fit ``points`` coordinates: about ``N/50`` and ``max/20`` (at least 1)."""
    top = max(1, round(points / POINTS_PER_MAX))
    return top, max(1, round(top / MAX_PER_MIN))


def coarse_partition(cells: int, points: int, config: CellConfig) -> str:
    """A one-line warning when ``cells`` cells from ``points`` coordinates make too coarse a partition (fewer
    than :data:`FEW_CELLS`, or ``max_per_cell`` above a tenth of the coordinates), naming thresholds that fit
    the data and the rule they follow; "" when the partition is fine."""
    if cells >= FEW_CELLS and config.max_per_cell * 10 <= points:
        return ""
    top, low = fitting_thresholds(points)
    head = (
        f"only {cells} cell{'' if cells == 1 else 's'} from {points} coordinates with max_per_cell "
        f"{config.max_per_cell} and min_per_cell {config.min_per_cell}: too coarse to tell places apart"
    )
    if (top, low) == (config.max_per_cell, config.min_per_cell) or top > config.max_per_cell:
        return f"{head}; the coordinates are too few or too close together to split finer: give more coordinates"
    return (
        f"{head}; thresholds that fit {points} coordinates: --cells.max_per_cell {top} --cells.min_per_cell {low} "
        f"(max_per_cell about N/{POINTS_PER_MAX}, min_per_cell about max_per_cell/{MAX_PER_MIN})"
    )


def leaf_ids(lat: ArrayLike, lon: ArrayLike, progress: bool = False) -> NDArray[np.uint64]:
    """S2 leaf (level-30) cell ids of points, ``(N,)`` uint64."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    out = np.empty(len(lat), dtype=np.uint64)
    from_ll, from_deg = s2sphere.CellId.from_lat_lng, s2sphere.LatLng.from_degrees
    it = progress_bar(range(len(lat)), desc="S2 ids", unit="pt", show=progress, mininterval=1.0)
    for i in it:
        out[i] = from_ll(from_deg(lat[i], lon[i])).id()
    return out


@dataclass
class CellTable:
    """The classes of the classifier: one row per S2 cell.

    Attributes:
        tokens: S2 tokens, ``(C,)``.
        level: S2 levels, ``(C,)``.
        lat, lon: centroid of the member points (spherical mean), degrees, ``(C,)``.
        count: member points, ``(C,)``.
        spread_km: RMS distance of members to the centroid, ``(C,)``; seeds the vMF concentrations.
        config: the thresholds the table was built with, when known (kept in a ``.json`` beside the CSV).
    """

    tokens: list[str]
    level: NDArray[np.int64]
    lat: NDArray[np.float64]
    lon: NDArray[np.float64]
    count: NDArray[np.int64]
    spread_km: NDArray[np.float64]
    config: CellConfig | None = field(default=None, compare=False)
    _ranges: tuple[NDArray[np.uint64], NDArray[np.uint64], NDArray[np.int64]] | None = field(
        default=None, repr=False, compare=False
    )
    _xyz: NDArray[np.float64] | None = field(default=None, repr=False, compare=False)
    _polygons: dict[int, tuple[tuple[float, float], ...]] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def xyz(self) -> NDArray[np.float64]:
        """Unit vectors of the centroids, ``(C, 3)`` (computed once, read-only)."""
        if self._xyz is None or len(self._xyz) != len(self.lat):
            xyz = latlon_to_xyz(self.lat, self.lon)
            xyz.flags.writeable = False
            self._xyz = xyz
        return self._xyz

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        for i, tok in enumerate(self.tokens):
            w.writerow(
                [
                    tok,
                    int(self.level[i]),
                    f"{self.lat[i]:.6f}",
                    f"{self.lon[i]:.6f}",
                    int(self.count[i]),
                    f"{self.spread_km[i]:.3f}",
                ]
            )
        return buf.getvalue()

    @property
    def fingerprint(self) -> str:
        """Digest of the table's CSV form: equal tables, equal fingerprints."""
        return digest(self.to_csv())

    def save(self, path: str | Path) -> None:
        """Write the CSV and, when the build thresholds are known, a ``.json`` sidecar naming them."""
        path = Path(path)
        atomic_files.write_text(path, self.to_csv())
        if self.config is not None:
            atomic_files.write_json(
                path.with_suffix(".json"),
                {"format": "geoswc-cells/1", "fingerprint": self.fingerprint, "config": to_dict(self.config)},
            )

    @classmethod
    def load(cls, path: str | Path) -> CellTable:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"cell table not found: {path}; build one with `geoswc cells`")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArtifactError(f"cell table {path} is unreadable ({e})") from e
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or rows[0] != CSV_HEADER:
            raise ArtifactError(f"cell table {path} must start with the header {','.join(CSV_HEADER)}")
        tokens, level, lat, lon, count, spread = [], [], [], [], [], []
        for n, r in enumerate(rows[1:], start=2):
            try:
                tok = r[0]
                cid = s2sphere.CellId.from_token(tok)
                if not cid.is_valid():
                    raise ValueError(f"invalid S2 token {tok!r}")
                tokens.append(tok)
                level.append(int(r[1]))
                lat.append(float(r[2]))
                lon.append(float(r[3]))
                count.append(int(r[4]))
                spread.append(float(r[5]))
            except (ValueError, IndexError) as e:
                raise ArtifactError(f"cell table {path}, line {n}: {e}") from e
        if not tokens:
            raise ArtifactError(f"cell table {path} has no cells")
        if not validate_latlon(lat, lon).all():
            raise ArtifactError(f"cell table {path} has centroids out of range")
        table = cls(
            tokens, np.array(level, np.int64), np.array(lat), np.array(lon), np.array(count, np.int64), np.array(spread)
        )
        return dataclasses.replace(table, config=_sidecar_config(path, table.fingerprint))

    def _range_index(self) -> tuple[NDArray[np.uint64], NDArray[np.uint64], NDArray[np.int64]]:
        if self._ranges is None:
            cids = [s2sphere.CellId.from_token(t) for t in self.tokens]
            lo = np.array([c.range_min().id() for c in cids], dtype=np.uint64)
            hi = np.array([c.range_max().id() for c in cids], dtype=np.uint64)
            order = np.argsort(lo, kind="stable").astype(np.int64)
            self._ranges = (lo[order], hi[order], order)
        return self._ranges

    def assign(self, lat: ArrayLike, lon: ArrayLike) -> NDArray[np.int64]:
        """Index of the cell containing each point, ``(N,)``; -1 where the point's cell was dropped."""
        leaves = leaf_ids(np.atleast_1d(lat), np.atleast_1d(lon))
        lo, hi, order = self._range_index()
        pos = np.searchsorted(lo, leaves, side="right") - 1
        ok = (pos >= 0) & (leaves <= hi[np.clip(pos, 0, None)])
        return np.where(ok, order[np.clip(pos, 0, None)], -1)

    def polygon(self, i: int) -> list[tuple[float, float]]:
        """Outline ``(lat, lon)`` of cell ``i``, counter-clockwise: its four corners, with points added
        along the (geodesic) edges of large cells so they draw right on a flat map (computed once per cell)."""
        outline = self._polygons.get(i)
        if outline is None:
            outline = self._polygons[i] = tuple(self._outline(i))
        return list(outline)

    def _outline(self, i: int) -> list[tuple[float, float]]:
        cell = s2sphere.Cell(s2sphere.CellId.from_token(self.tokens[i]))
        corners = [np.array([v[0], v[1], v[2]]) for v in (cell.get_vertex(k) for k in range(4))]
        steps = 1 if int(self.level[i]) >= 8 else 8
        pts = []
        for k in range(4):
            a, b = corners[k], corners[(k + 1) % 4]
            for t in np.arange(steps) / steps:
                p = (1 - t) * a + t * b
                pts.append(p / np.linalg.norm(p))
        lat, lon = xyz_to_latlon(np.array(pts))
        return [(round(float(a), 6), round(float(b), 6)) for a, b in zip(lat, lon, strict=True)]


def _sidecar_config(path: Path, fingerprint: str) -> CellConfig | None:
    """The build thresholds from the ``.json`` beside a cell CSV, if it is there and describes this table."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    meta = json_records.read_json(side, "cell table metadata")
    if meta.get("fingerprint") != fingerprint:
        log.warning(
            "%s describes another cell table (fingerprint %s, the CSV has %s); ignoring it",
            side,
            meta.get("fingerprint"),
            fingerprint,
        )
        return None
    return from_dict(CellConfig, meta.get("config", {}))


def build_cells(lat: ArrayLike, lon: ArrayLike, config: CellConfig | None = None, progress: bool = False) -> CellTable:
    """Adaptive partition of the sphere from a coordinate list.

    Starting from the six S2 faces, the fullest cell is split into its four children while it holds
    more than ``max_per_cell`` points; finally cells with fewer than ``min_per_cell`` are dropped.

    Args:
        lat, lon: ``(N,)`` coordinates in degrees (invalid ones raise).
        config: thresholds; defaults to :class:`CellConfig`.

    Returns:
        The cells, sorted by S2 id (Hilbert order).
    """
    cfg = config or CellConfig()
    lat, lon = np.asarray(lat, np.float64).ravel(), np.asarray(lon, np.float64).ravel()
    if lat.shape != lon.shape or lat.size == 0:
        raise InputError("build_cells needs equal, non-empty lat and lon arrays")
    bad = ~validate_latlon(lat, lon)
    if bad.any():
        raise InputError(f"{int(bad.sum())} coordinates are not finite or out of range; clean them first")
    leaves = leaf_ids(lat, lon, progress=progress)
    order = np.argsort(leaves, kind="stable")
    sorted_leaves = leaves[order]

    def span(cid: s2sphere.CellId) -> tuple[int, int]:
        a = int(np.searchsorted(sorted_leaves, np.uint64(cid.range_min().id()), side="left"))
        b = int(np.searchsorted(sorted_leaves, np.uint64(cid.range_max().id()), side="right"))
        return a, b

    heap: list[tuple[int, int, int, int]] = []  # (-count, id, start, stop)
    for face in range(6):
        c = s2sphere.CellId.from_face_pos_level(face, 0, 0)
        a, b = span(c)
        heapq.heappush(heap, (-(b - a), c.id(), a, b))
    final: list[tuple[int, int, int]] = []
    while heap and -heap[0][0] > cfg.max_per_cell:
        _, cid_int, a, b = heapq.heappop(heap)
        cid = s2sphere.CellId(cid_int)
        if cid.level() >= cfg.max_level:
            final.append((cid_int, a, b))
            continue
        for child in cid.children():
            ca, cb = span(child)
            if cb > ca:
                heapq.heappush(heap, (-(cb - ca), child.id(), ca, cb))
    final.extend((cid_int, a, b) for _, cid_int, a, b in heap)
    final = sorted(c for c in final if c[2] - c[1] >= cfg.min_per_cell)
    if not final:
        raise InputError(
            f"no cell keeps at least min_per_cell={cfg.min_per_cell} of the {lat.size} points; "
            "lower min_per_cell or give more coordinates"
        )
    tokens, level, clat, clon, count, spread = [], [], [], [], [], []
    for cid_int, a, b in final:
        cid = s2sphere.CellId(cid_int)
        members = order[a:b]
        mlat, mlon = spherical_mean(lat[members], lon[members])
        d = haversine_km(mlat, mlon, lat[members], lon[members])
        tokens.append(cid.to_token())
        level.append(cid.level())
        clat.append(mlat)
        clon.append(mlon)
        count.append(b - a)
        spread.append(float(np.sqrt(np.mean(d**2))))
    dropped = lat.size - int(np.sum(count))
    log.info("%d cells from %d points (%d points in dropped cells)", len(tokens), lat.size, dropped)
    table = CellTable(
        tokens, np.array(level, np.int64), np.array(clat), np.array(clon), np.array(count, np.int64), np.array(spread)
    )
    # Round to the CSV's precision so a built table and its saved copy are identical.
    return CellTable(
        table.tokens,
        table.level,
        np.round(table.lat, 6),
        np.round(table.lon, 6),
        table.count,
        np.round(table.spread_km, 3),
        config=cfg,
    )


def check_cells(config: ModelConfig, cells: CellTable) -> None:
    """A model config and the cell table it is given: the table the config names, when it names one."""
    if config.cells_fingerprint and config.cells_fingerprint != cells.fingerprint:
        raise ModelMismatchError(
            f"cell table {cells.fingerprint} is not the one the model was built with "
            f"({config.cells_fingerprint}); use the model's own cells.csv"
        )
    if config.num_cells and config.num_cells != len(cells):
        raise ModelMismatchError(
            f"the model has {config.num_cells} cells, the cell table {len(cells)}; use the model's own cells.csv"
        )
