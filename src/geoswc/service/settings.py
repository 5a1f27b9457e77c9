"""Limits and options of the web service, from ``geoswc serve`` flags and ``GEOSWC_*`` environment variables.

Imports nothing heavy: the ``serve`` command's options are built from :class:`ServiceSettings` without
loading FastAPI.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypedDict
from urllib.parse import urlsplit

from geoswc.core.config import check_field, check_ints
from geoswc.core.errors import InputError
from geoswc.data.images import ImageLimits

MiB = 2**20
_PART_OVERHEAD = 64 * 1024
"""Room per part for multipart headers and boundaries, for the whole-body limit."""
MAX_OTHER_BYTES = 64 * 1024
"""Bytes of non-file form fields accepted per request."""
_DAY_S = 86_400
"""The longest time setting accepted: a day."""


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and options of the web service. Each has an environment variable (see :data:`ENV_VARS`);
    ``geoswc serve --service.FIELD`` flags win over the environment."""

    max_upload_mb: float = 20.0
    """Largest accepted file in MiB; a larger upload is refused with 413 while streaming."""
    max_pixels: int = 50_000_000
    """Largest width x height decoded (decompression-bomb guard); larger images get 413."""
    max_files: int = 16
    """Most files in one request; more get 413."""
    max_concurrent: int = 2
    """Requests running inference at once (each in a worker thread)."""
    max_queue: int = 8
    """Further requests admitted to upload and wait for a slot; beyond, 503 with Retry-After."""
    queue_timeout_s: float = 30.0
    """Longest wait for an inference slot before answering 503."""
    upload_timeout_s: float = 120.0
    """Longest time a request's upload may take; longer gets 408 (and its admission is given back)."""
    upload_idle_s: float = 5.0
    """Longest pause between two chunks of an upload, and the grace before ``upload_min_kbs`` applies."""
    upload_min_kbs: float = 32.0
    """Slowest average upload rate (KiB/s) accepted after ``upload_idle_s``: a trickling client gets 408."""
    max_request_pixels: int = 400_000_000
    """Pixels of all the photos of one request together (what decoding them costs in memory); more gets 413."""
    token: str | None = None
    """When set, ``/api/*`` requires ``Authorization: Bearer <token>`` (prefer $GEOSWC_TOKEN: a flag is
    visible to other users in the process list)."""
    tiles: str | None = None
    """Optional tile URL template (``https://{s}.tile.example.org/{z}/{x}/{y}.png``) for the page."""
    tiles_attribution: str | None = None
    """Attribution shown for the tiles."""
    warmup: bool = True
    """Locate a dummy image at start-up (loads the place index, caches), so the first request is fast."""

    def __post_init__(self) -> None:
        check_ints(self)
        check_field(
            self,
            "max_upload_mb",
            math.isfinite(self.max_upload_mb) and 1 <= self.max_upload_bytes <= 2**40,
            "must be a positive number of MiB, at most 2**20 (1 TiB)",
        )
        for name in ("max_pixels", "max_files", "max_concurrent"):
            check_field(self, name, int(getattr(self, name)) >= 1, "must be at least 1")
        check_field(self, "max_queue", self.max_queue >= 0, "must be >= 0")
        for name in ("queue_timeout_s", "upload_timeout_s", "upload_idle_s"):
            check_field(self, name, 0 < getattr(self, name) <= _DAY_S, f"must be a number of seconds in (0, {_DAY_S}]")
        check_field(self, "upload_min_kbs", 0 <= self.upload_min_kbs <= 2**20, "must be a number of KiB/s in 0..2**20")
        check_field(
            self,
            "max_request_pixels",
            self.max_request_pixels >= self.max_pixels,
            f"must be at least max_pixels ({self.max_pixels})",
        )
        check_field(
            self,
            "tiles",
            self.tiles is None or urlsplit(self.tiles).scheme in ("http", "https"),
            "must start with http:// or https://",
        )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MiB)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels)

    @property
    def max_body_bytes(self) -> int:
        """Whole-request bound: every file at its limit plus multipart framing."""
        return self.max_files * (self.max_upload_bytes + _PART_OVERHEAD) + MAX_OTHER_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """Settings from ``GEOSWC_*`` environment variables, then ``overrides`` (None values are ignored)."""
        env = os.environ if environ is None else environ
        types = {f.name: f.type for f in fields(cls)}
        kw: dict[str, Any] = {}
        for var, (name, conv) in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                kw[name] = conv(raw.strip())
            except ValueError as e:
                raise InputError(f"${var}={raw!r} is not a valid {types[name]}") from e
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


ENV_VARS: dict[str, tuple[str, Any]] = {
    "GEOSWC_MAX_UPLOAD_MB": ("max_upload_mb", float),
    "GEOSWC_MAX_PIXELS": ("max_pixels", int),
    "GEOSWC_MAX_FILES": ("max_files", int),
    "GEOSWC_MAX_CONCURRENT": ("max_concurrent", int),
    "GEOSWC_MAX_QUEUE": ("max_queue", int),
    "GEOSWC_QUEUE_TIMEOUT": ("queue_timeout_s", float),
    "GEOSWC_UPLOAD_TIMEOUT": ("upload_timeout_s", float),
    "GEOSWC_UPLOAD_IDLE": ("upload_idle_s", float),
    "GEOSWC_UPLOAD_MIN_KBS": ("upload_min_kbs", float),
    "GEOSWC_MAX_REQUEST_PIXELS": ("max_request_pixels", int),
    "GEOSWC_TOKEN": ("token", str),
    "GEOSWC_TILES": ("tiles", str),
    "GEOSWC_TILES_ATTRIBUTION": ("tiles_attribution", str),
}
"""Environment variable -> (settings field, parser)."""

ServiceChanges = TypedDict(  # type: ignore[misc]
    "ServiceChanges", {k: v for k, v in typing.get_type_hints(ServiceSettings).items() if k != "warmup"}, total=False
)
"""Settings to change from the environment's (``{"max_queue": 1}``)."""
NO_SERVICE_CHANGES: ServiceChanges = {}
"""The default of a ``service`` parameter: the environment's settings (never mutated)."""
