"""Limits and options of the web service, from ``geoswc serve`` flags and ``GEOSWC_*`` environment variables.

Imports nothing heavy: the ``serve`` command's options are built from :class:`ServiceSettings` without
loading FastAPI.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
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


def _env(default: Any, var: str) -> Any:
    """A settings field read from the environment variable ``var`` too (the one place that names it)."""
    return field(default=default, metadata={"env": var})


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and options of the web service. Each has an environment variable (see :data:`ENV_VARS`);
    ``geoswc serve --service.FIELD`` flags win over the environment."""

    max_upload_mb: float = _env(20.0, "GEOSWC_MAX_UPLOAD_MB")
    """Largest accepted file in MiB; a larger upload is refused with 413 while streaming."""
    max_pixels: int = _env(50_000_000, "GEOSWC_MAX_PIXELS")
    """Largest width x height decoded (decompression-bomb guard); larger images get 413."""
    max_files: int = _env(16, "GEOSWC_MAX_FILES")
    """Most files in one request; more get 413."""
    max_concurrent: int = _env(2, "GEOSWC_MAX_CONCURRENT")
    """Requests running inference at once (each in a worker thread)."""
    max_queue: int = _env(8, "GEOSWC_MAX_QUEUE")
    """Further requests admitted to upload and wait for a slot; beyond, 503 with Retry-After."""
    queue_timeout_s: float = _env(30.0, "GEOSWC_QUEUE_TIMEOUT")
    """Longest wait for an inference slot before answering 503."""
    upload_timeout_s: float = _env(120.0, "GEOSWC_UPLOAD_TIMEOUT")
    """Longest time a request's upload may take; longer gets 408 (and its admission is given back)."""
    upload_idle_s: float = _env(5.0, "GEOSWC_UPLOAD_IDLE")
    """Longest pause between two chunks of an upload, and the grace before ``upload_min_kbs`` applies."""
    upload_min_kbs: float = _env(32.0, "GEOSWC_UPLOAD_MIN_KBS")
    """Slowest average upload rate (KiB/s) accepted after ``upload_idle_s``: a trickling client gets 408."""
    max_request_pixels: int = _env(400_000_000, "GEOSWC_MAX_REQUEST_PIXELS")
    """Pixels of all the photos of one request together (what decoding them costs in memory); more gets 413."""
    token: str | None = _env(None, "GEOSWC_TOKEN")
    """When set, ``/api/*`` requires ``Authorization: Bearer <token>`` (prefer $GEOSWC_TOKEN: a flag is
    visible to other users in the process list)."""
    tiles: str | None = _env(None, "GEOSWC_TILES")
    """Optional tile URL template (``https://{s}.tile.example.org/{z}/{x}/{y}.png``) for the page."""
    tiles_attribution: str | None = _env(None, "GEOSWC_TILES_ATTRIBUTION")
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


_PARSERS = {"float": float, "int": int, "str": str}
ENV_VARS: dict[str, tuple[str, Any]] = {
    f.metadata["env"]: (f.name, _PARSERS[str(f.type).split(" | ")[0]])
    for f in fields(ServiceSettings)
    if "env" in f.metadata
}
"""Environment variable -> (settings field, parser)."""

ServiceChanges = TypedDict(  # type: ignore[misc]
    "ServiceChanges", {k: v for k, v in typing.get_type_hints(ServiceSettings).items() if k != "warmup"}, total=False
)
"""Settings to change from the environment's (``{"max_queue": 1}``)."""
NO_SERVICE_CHANGES: ServiceChanges = {}
"""The default of a ``service`` parameter: the environment's settings (never mutated)."""
