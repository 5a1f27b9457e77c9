"""Typed response models of the web service, mirroring :mod:`geoswc.prediction.results`' dataclasses field for
field.

``extra="forbid"`` makes a field added to a dataclass but not here fail response validation (and
``tests/test_service.py`` compares both sides), so the OpenAPI schema cannot drift from
:meth:`geoswc.prediction.results.Prediction.to_dict`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlaceModel(_Strict):
    """The nearest GeoNames place (population >= 1000) to the estimate."""

    name: str
    admin1: str = Field(description="Region (state, province).")
    admin2: str = Field(description="Sub-region (county, district); may be empty.")
    country_code: str = Field(description="ISO 3166-1 alpha-2.")
    country: str
    lat: float
    lon: float
    distance_km: float = Field(description="From the estimate to this place.")


class ExifModel(_Strict):
    """The position in the photo's own GPS EXIF, and how far the estimate is from it."""

    lat: float
    lon: float
    distance_km: float


class CellModel(_Strict):
    """A classifier cell and its probability."""

    token: str = Field(description="S2 cell token.")
    lat: float = Field(description="Centroid of the cell's photos.")
    lon: float
    probability: float
    polygon: list[tuple[float, float]] = Field(
        description="The cell's outline as (lat, lon) points, counter-clockwise; longitudes may jump at ±180."
    )


class NeighborModel(_Strict):
    """A retrieved gallery photo."""

    image: str
    lat: float
    lon: float
    similarity: float = Field(description="Cosine similarity of the retrieval embeddings.")
    cluster: int = Field(description="DBSCAN label among the retrieved neighbours (-1: noise).")
    row: int = Field(description="Its row in the served gallery index.")
    thumbnail: bool = Field(
        description="Whether the index holds a thumbnail of it: GET /api/thumbnails/{row} (image/jpeg) returns it."
    )


class PredictionModel(_Strict):
    """Where a photo was taken (the JSON of ``geoswc locate --format jsonl``)."""

    image: str = Field(description="The uploaded file's name.")
    lat: float
    lon: float
    confidence: float = Field(description="Prediction density: probability mass of the cells near the chosen one.")
    method: str = Field(description="swc, classification or retrieval.")
    cell: str = Field(description="S2 token of the searched cell.")
    cell_probability: float
    top_cells: list[CellModel]
    neighbors: list[NeighborModel]
    cluster: int = Field(description="DBSCAN label of the cluster whose mean is the estimate (-1: none).")
    fallback: bool = Field(description="The estimate is the cell centroid: the cell holds no gallery photo.")
    place: PlaceModel | None
    exif: ExifModel | None
    cell_polygon: list[tuple[float, float]] = Field(
        description="The searched cell's outline as (lat, lon) points; it may not be among top_cells."
    )
    signals: dict[str, float] = Field(
        description="What the calibrator reads: density_25/200/750/2500 (prediction density at those radii), "
        "cell_probability, top_similarity, cluster_size (share of k), cluster_similarity, fallback."
    )
    within_km: dict[str, float] | None = Field(
        description="Calibrated probability that the estimate lies within 1, 25, 200, 750 and 2500 km of the truth "
        "(keys '1' ... '2500'), non-decreasing; null when the model has no calibrator."
    )
    localizable: bool | None = Field(
        description="Whether within_km meets the model's localizable rule (P(within r km) >= p); null without a "
        "calibrator. A non-localizable estimate is still given, marked."
    )
    prior_kl: float | None = Field(
        description="How far the photo moved the cell probabilities from the model's prior (KL, nats); null "
        "without a gallery."
    )
    prior_like: bool | None = Field(
        description="The estimate is no better than the model's prior (the photo moved the cell probabilities "
        "little and no gallery photos agree on a place); null without a gallery."
    )


class FailureModel(_Strict):
    """A photo of a multi-file request that could not be located."""

    image: str
    error: str
    kind: str = Field(description="empty, unsupported, corrupt, too_large or unreadable.")
    status: int = Field(description="The HTTP status this failure would have on its own (413, 415 or 422).")


class ErrorModel(_Strict):
    """The body of every 4xx/5xx answer of ``/api/*`` (except FastAPI's own validation errors)."""

    error: str
    kind: str = Field(
        description="What went wrong: empty, unsupported, corrupt, too_large, unreadable, "
        "too_many_files, bad_request, unauthorized, busy, not_found, damaged, internal."
    )
    status: int
    image: str | None = Field(default=None, description="The file at fault, when there is one.")


class HealthModel(_Strict):
    """Service and model identity."""

    status: str
    version: str
    model_fingerprint: str
    gallery_size: int = Field(description="Photos in the gallery index (0: classification only).")
    cells: int = Field(description="Cells of the classifier.")
    methods: list[str]


class LimitsModel(_Strict):
    """The service's input limits."""

    max_upload_bytes: int
    max_pixels: int
    max_files: int
    max_concurrent: int
    max_queue: int


class RuleModel(_Strict):
    """Which estimates are called localizable: P(within ``within_km``) >= ``p``."""

    within_km: float
    p: float


class PageConfigModel(_Strict):
    """What the page needs to know (public, no secrets)."""

    version: str
    auth_required: bool
    tiles: str | None
    tiles_attribution: str | None
    limits: LimitsModel
    localizable_rule: RuleModel | None = Field(
        description="The served model's localizable rule; null without a calibrator."
    )
    select_km: float = Field(
        description="The served model's select_km: the searched cell is the one whose neighbourhood within it holds "
        "the most probability (0: the most probable cell)."
    )
