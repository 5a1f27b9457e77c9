"""What locating a photo gives back, and the formats a batch of results is written in."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from geoswc.core import text_cells
from geoswc.core.errors import InputError
from geoswc.core.sphere import haversine_km
from geoswc.geo.places import Place


@dataclass
class CellProbability:
    """A cell and the classifier's probability for it."""

    token: str
    """S2 cell token."""
    lat: float
    lon: float
    """Centroid of the cell's photos (the vMF mean direction)."""
    probability: float
    polygon: list[tuple[float, float]]
    """The cell's outline as ``(lat, lon)`` points, counter-clockwise (for maps)."""


@dataclass
class Neighbor:
    """A retrieved gallery photo."""

    image: str
    lat: float
    lon: float
    similarity: float
    """Cosine similarity of the retrieval embeddings (higher is more alike)."""
    cluster: int
    """DBSCAN label among the retrieved neighbours (-1: noise)."""
    row: int = -1
    """Its row in the gallery index (what :meth:`geoswc.prediction.geolocator.Geolocator.thumbnail` and the service's
    ``GET /api/thumbnails/{row}`` take)."""
    thumbnail: bool = False
    """Whether the index holds a thumbnail of it (an index built with ``geoswc index --thumbnails``)."""


@dataclass
class ExifPosition:
    """The position recorded in the photo's own GPS EXIF, and how far the estimate is from it."""

    lat: float
    lon: float
    distance_km: float


@dataclass
class Prediction:
    """Where a photo was taken, and why the model thinks so."""

    image: str
    lat: float
    lon: float
    confidence: float
    """Prediction density: probability mass of the cells within ``r_km`` of the chosen cell."""
    method: str
    cell: str
    """S2 token of the searched cell: the most probable one, or with ``select_km`` > 0 the cell whose
    ``select_km`` neighbourhood holds the most probability mass."""
    cell_probability: float
    top_cells: list[CellProbability]
    neighbors: list[Neighbor] = field(default_factory=list)
    cluster: int = -1
    """DBSCAN label of the cluster whose mean is the estimate (-1: none)."""
    fallback: bool = False
    """True when the estimate is the cell centroid because the cell holds no gallery photo."""
    place: Place | None = None
    exif: ExifPosition | None = None
    cell_polygon: list[tuple[float, float]] = field(default_factory=list)
    """The searched cell's outline as ``(lat, lon)`` points (for maps; it may not be among ``top_cells``)."""
    signals: dict[str, float] = field(default_factory=dict)
    """What a calibrator reads (:data:`geoswc.prediction.calibration.SIGNALS`): prediction density at
    25/200/750/2500 km, the top cell's probability, the best retrieval similarity, the winning cluster's share
    of ``k`` and mean similarity, and the fallback flag."""
    within_km: dict[str, float] | None = None
    """Calibrated probability that the estimate lies within each threshold (``"1"``, ``"25"``, ``"200"``,
    ``"750"``, ``"2500"`` km) of the truth; non-decreasing. None: the model has no calibrator."""
    localizable: bool | None = None
    """Whether ``within_km`` meets the localizable rule (``P(<= r km) >= p``). None: no calibrator."""
    prior_kl: float | None = None
    """How far the photo moved the classifier's cell probabilities from the model's prior (the gallery's share of
    photos in each cell), KL in nats: near 0, the photo told the classifier nothing. None: no gallery."""
    prior_like: bool | None = None
    """True when the estimate is no better than the model's prior: ``prior_kl`` is small and no cluster of gallery
    photos agrees on a place (:class:`~geoswc.prediction.swc.PriorRule`); the answer is then what the model would
    guess for any photo. None: no gallery."""

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested ones as dicts (what ``--format jsonl`` writes)."""
        return plain(self)

    def __repr__(self) -> str:
        """One line: the photo, the estimate, its place and how sure it is (the details: :meth:`to_dict`)."""
        near = f", near={self.place.label()!r}" if self.place is not None else ""
        within = f", within_25_km={self.within_km['25']:.2f}" if self.within_km is not None else ""
        prior = f", prior_like={self.prior_like}" if self.prior_like is not None else ""
        return (
            f"Prediction(image={self.image!r}, lat={self.lat:.5f}, lon={self.lon:.5f}{near}, method={self.method!r}, "
            f"confidence={self.confidence:.3f}{within}{prior}, neighbors={len(self.neighbors)})"
        )

    def with_gps(self, gps: tuple[float, float] | None) -> None:
        """Record the photo's own GPS position (from its EXIF) and the estimate's distance to it."""
        if gps is not None:
            self.exif = ExifPosition(gps[0], gps[1], float(haversine_km(self.lat, self.lon, gps[0], gps[1])))

    @property
    def agreeing(self) -> list[Neighbor]:
        """The retrieved photos in the cluster the estimate is the mean of (none when it is no cluster)."""
        return [n for n in self.neighbors if n.cluster == self.cluster and self.cluster >= 0]


@dataclass
class LocateFailure:
    """A photo that could not be located, and why (batch jobs report these and carry on)."""

    image: str
    error: str
    kind: str = "corrupt"

    def to_dict(self) -> dict[str, Any]:
        return plain(self)


Result = Prediction | LocateFailure


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def plain(value: Any) -> Any:
    """``dataclasses.asdict``'s result for a result (dataclasses as dicts, lists and dicts copied), without its
    deep copies of the immutable leaves: a tuple of numbers (a polygon's point) is kept as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(getattr(value, k)) for k in _field_names(type(value))}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return value if all(isinstance(v, (int, float, str)) for v in value) else tuple(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# -- output formats -----------------------------------------------------------------------------------

OutputFormat = Literal["text", "jsonl", "csv", "geojson"]
"""``text``: a readable block per photo; ``jsonl``: :meth:`Prediction.to_dict` per line; ``csv``:
:data:`CSV_COLUMNS`; ``geojson``: a FeatureCollection of points."""
OUTPUT_FORMATS: dict[str, OutputFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".geojson": "geojson",
    ".txt": "text",
}
"""File extension -> output format."""

WITHIN_KEYS = ("1", "25", "200", "750", "2500")
"""The thresholds of ``within_km``, as its keys (:data:`geoswc.prediction.calibration.THRESHOLD_KEYS`)."""
SHOWN_KEYS = ("25", "200", "750", "2500")
"""The thresholds the text output puts in words."""
CSV_COLUMNS = (
    "image",
    "lat",
    "lon",
    "confidence",
    "method",
    "cell",
    "cell_probability",
    "fallback",
    *(f"within_{k}_km" for k in WITHIN_KEYS),
    "localizable",
    "prior_like",
    "place",
    "country",
    "exif_lat",
    "exif_lon",
    "exif_distance_km",
    "error",
    "kind",
)
NO_CALIBRATOR = "not calibrated: this model has no calibrator (fit one with `geoswc calibrate`)"


def output_format(path: str | Path | None, fmt: str | None = None) -> OutputFormat:
    """``fmt`` when given, else the format of ``path``'s extension, else ``text`` (no path: the terminal)."""
    if fmt is not None:
        if fmt not in OUTPUT_FORMATS.values():
            raise InputError(f"unknown output format {fmt!r}; choose text, jsonl, csv or geojson")
        return fmt  # type: ignore[return-value]
    if path is None:
        return "text"
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InputError(
            f"cannot tell the output format from {str(path)!r}: name it .jsonl, .csv, .geojson or "
            ".txt, or give the format"
        )
    return OUTPUT_FORMATS[suffix]


def prediction_row(result: Result) -> dict[str, Any]:
    """A flat record of one result (the CSV row, the GeoJSON properties); failures fill ``error``/``kind``."""
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, "")
    row["image"] = result.image
    if isinstance(result, LocateFailure):
        row.update(error=result.error, kind=result.kind)
        return row
    row.update(
        lat=round(result.lat, 6),
        lon=round(result.lon, 6),
        confidence=round(result.confidence, 4),
        method=result.method,
        cell=result.cell,
        cell_probability=round(result.cell_probability, 4),
        fallback=result.fallback,
    )
    if result.prior_like is not None:
        row["prior_like"] = result.prior_like
    if result.within_km is not None:
        row.update({f"within_{k}_km": result.within_km[k] for k in WITHIN_KEYS}, localizable=result.localizable)
    if result.place is not None:
        row.update(place=result.place.label(), country=result.place.country)
    if result.exif is not None:
        row.update(
            exif_lat=result.exif.lat, exif_lon=result.exif.lon, exif_distance_km=round(result.exif.distance_km, 3)
        )
    return row


def format_text(p: Result) -> str:
    """A human-readable block for one result."""
    if isinstance(p, LocateFailure):
        return f"{p.image}\n  error       {p.error}"
    lines = [p.image, f"  estimate    {p.lat:.5f}, {p.lon:.5f}   ({p.method}; confidence {p.confidence:.2f})"]
    lines += chances_text(p)
    if p.place is not None:
        d = p.place.distance_km
        lines.append(
            f"  near        {p.place.label()} ({d:.1f} km away)"
            if d < 10
            else f"  near        {p.place.label()} ({d:.0f} km away)"
        )
    lines.append(f"  cell        {p.cell} ({100 * p.cell_probability:.1f} %, searched)")
    if p.prior_like:
        lines.append(
            f"  prior       no better than the model's prior: it is what the model answers for almost any photo\n"
            f"              (the photo moved the cell probabilities by {p.prior_kl:.2f} nats; no gallery photos agree)"
        )
    if p.fallback:
        lines.append("  note        the cell holds no gallery photo: the cell's centroid is the estimate")
    elif p.neighbors:
        lines.append(
            f"  evidence    {len(p.agreeing)} of {len(p.neighbors)} nearest gallery photos agree "
            f"(best similarity {p.neighbors[0].similarity:.2f})"
        )
    lines.append(
        "  top cells   "
        + "\n              ".join(
            f"{i + 1}. {c.token:<16} {100 * c.probability:5.1f} %  ({c.lat:.3f}, {c.lon:.3f})"
            for i, c in enumerate(p.top_cells)
        )
    )
    if p.exif is not None:
        lines.append(
            f"  GPS EXIF    {p.exif.lat:.5f}, {p.exif.lon:.5f}   (estimate is {p.exif.distance_km:.1f} km off)"
        )
    return "\n".join(lines)


def chances_text(p: Prediction) -> list[str]:
    """The calibrated chances in words, and whether the photo is localizable (or why neither is known)."""
    if p.within_km is None:
        return [f"  chances     {NO_CALIBRATOR}"]
    words = ", ".join(f"within {k} km: {_percent(p.within_km[k])}" for k in SHOWN_KEYS)
    return [
        f"  chances     {words}",
        f"  localizable {'yes' if p.localizable else 'no: the estimate is shown, but do not rely on it'}",
    ]


def _percent(v: float) -> str:
    return f"{100 * v:.0f} %" if v >= 0.01 else "< 1 %"


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinity) replaced by None, through lists and dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_line(value: Any) -> str:
    """``value`` as one line of strict JSON: a number JSON cannot hold is written ``null``, never ``NaN``."""
    return json.dumps(finite(value), ensure_ascii=False, allow_nan=False)


class PredictionWriter:
    """Streams results to a text stream in one of the :data:`OutputFormat` s (CSV text cells that a spreadsheet
    would run, beginning with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return, get a ``'`` in front). Use as a
    context manager, or call :meth:`close` to finish (GeoJSON needs its closing brackets)."""

    def __init__(self, stream: TextIO, fmt: OutputFormat) -> None:
        self.stream, self.fmt = stream, output_format(None, fmt)
        self.located = self.failed = 0
        if fmt == "csv":
            stream.write(text_cells.csv_row(CSV_COLUMNS))
        elif fmt == "geojson":
            stream.write('{"type": "FeatureCollection", "features": [\n')

    def write(self, result: Result) -> None:
        ok = isinstance(result, Prediction)
        if self.fmt == "text":
            self.stream.write(format_text(result) + "\n")
        elif self.fmt == "jsonl":
            self.stream.write(json_line(result.to_dict()) + "\n")
        elif self.fmt == "csv":  # text cells escaped for spreadsheets (text_cells.csv_text), numbers as they are
            row = prediction_row(result)
            cells = (row[k] for k in CSV_COLUMNS)
            self.stream.write(text_cells.csv_row([text_cells.csv_text(v) if isinstance(v, str) else v for v in cells]))
        else:
            row = {k: v for k, v in prediction_row(result).items() if v != "" and k not in ("lat", "lon")}
            geometry = {"type": "Point", "coordinates": [round(result.lon, 6), round(result.lat, 6)]} if ok else None
            sep = ",\n" if self.located + self.failed else ""
            self.stream.write(sep + json_line({"type": "Feature", "geometry": geometry, "properties": row}))
        self.stream.flush()
        if ok:
            self.located += 1
        else:
            self.failed += 1

    def close(self) -> None:
        if self.fmt == "geojson":
            self.stream.write("\n]}\n")
        self.stream.flush()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
