"""The FastAPI application: ``POST /api/locate``, ``GET /api/health``, and the map page at ``/``.

Every prediction goes through :meth:`geoswc.api.Geolocator.locate_batch` (the one prediction path), in a
worker thread, behind a bounded admission gate. Uploads are parsed from the request stream with per-file
byte limits, so an oversized file is refused (413) as soon as it crosses the limit, never buffered whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import logging
import math
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import GeoswcError, InputError
from ..images import ImageLimits
from .schemas import ErrorModel, FailureModel, HealthModel, LimitsModel, PageConfigModel, PredictionModel

if TYPE_CHECKING:
    from ..api import Geolocator, LocateFailure, Prediction

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
UPLOAD_FIELD = "files"
MiB = 2**20

KIND_STATUS: dict[str, int] = {"empty": 422, "corrupt": 422, "unreadable": 422, "unsupported": 415, "too_large": 413}
"""HTTP status of each :class:`geoswc.errors.ImageError` kind."""

_PART_OVERHEAD = 64 * 1024
"""Room per part for multipart headers and boundaries, for the whole-body limit."""
_MAX_OTHER_FIELDS = 32
_MAX_OTHER_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and options of the web service. Each has a ``geoswc serve`` flag and an environment variable
    (see :data:`ENV_VARS`); flags win over the environment."""

    max_upload_bytes: int = 20 * MiB
    """Largest accepted file (bytes); a larger upload is refused with 413 while streaming."""
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
    token: str | None = None
    """When set, ``/api/*`` requires ``Authorization: Bearer <token>``."""
    tiles: str | None = None
    """Optional tile URL template (``https://{s}.tile.example.org/{z}/{x}/{y}.png``) for the page."""
    tiles_attribution: str | None = None
    """Attribution shown for the tiles."""
    warmup: bool = True
    """Locate a dummy image at start-up (loads the place index, caches), so the first request is fast."""

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_files", "max_concurrent"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.queue_timeout_s <= 0:
            raise InputError("max_queue must be >= 0 and queue_timeout_s > 0")
        if self.tiles is not None and urlsplit(self.tiles).scheme not in ("http", "https"):
            raise InputError(f"the tile URL must start with http:// or https://, got {self.tiles!r}")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels)

    @property
    def max_body_bytes(self) -> int:
        """Whole-request bound: every file at its limit plus multipart framing."""
        return self.max_files * (self.max_upload_bytes + _PART_OVERHEAD) + _MAX_OTHER_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """Settings from ``GEOSWC_*`` environment variables, then ``overrides`` (None values are ignored)."""
        env = os.environ if environ is None else environ
        kw: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
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


def _mib(v: str) -> int:
    return int(float(v) * MiB)


ENV_VARS: dict[str, tuple[str, Any]] = {
    "GEOSWC_MAX_UPLOAD_MB": ("max_upload_bytes", _mib),
    "GEOSWC_MAX_PIXELS": ("max_pixels", int),
    "GEOSWC_MAX_FILES": ("max_files", int),
    "GEOSWC_MAX_CONCURRENT": ("max_concurrent", int),
    "GEOSWC_MAX_QUEUE": ("max_queue", int),
    "GEOSWC_QUEUE_TIMEOUT": ("queue_timeout_s", float),
    "GEOSWC_TOKEN": ("token", str),
    "GEOSWC_TILES": ("tiles", str),
    "GEOSWC_TILES_ATTRIBUTION": ("tiles_attribution", str),
}
"""Environment variable -> (settings field, parser). Sizes are in MiB."""


class ServiceError(Exception):
    """An error answered as :class:`ErrorModel` JSON with the given status."""

    def __init__(self, status: int, kind: str, message: str, image: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.image, self.headers = status, kind, message, image, headers

    def response(self) -> JSONResponse:
        body = ErrorModel(error=self.message, kind=self.kind, status=self.status, image=self.image)
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


class InferenceGate:
    """Bounds the work in flight: at most ``slots`` requests run inference, and at most ``slots + queue``
    are admitted at all (uploading or waiting); beyond that, or after waiting ``timeout`` seconds for a
    slot, requests get 503 with a ``Retry-After`` estimated from recent inference times."""

    def __init__(self, slots: int, queue: int, timeout: float) -> None:
        self.slots, self.capacity, self.timeout = slots, slots + queue, timeout
        self.admitted = 0
        self._sem = asyncio.Semaphore(slots)
        self._seconds = 1.0  # moving average of an inference's duration

    def retry_after(self) -> int:
        return int(min(60, max(1, math.ceil(self._seconds * max(1, self.admitted) / self.slots))))

    def _busy(self, why: str) -> ServiceError:
        wait = self.retry_after()
        return ServiceError(503, "busy", f"the service is busy ({why}); retry in {wait} s",
                            headers={"Retry-After": str(wait)})

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.admitted >= self.capacity:
            raise self._busy(f"{self.admitted} requests in progress")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._sem.acquire(), self.timeout)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            raise self._busy(f"no inference slot free within {self.timeout:g} s") from None
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._sem.release()
            self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - t0)


# -- uploads -----------------------------------------------------------------------------------------


@dataclass
class Upload:
    """One uploaded file: its client-side name (never used as a path) and its bytes."""

    name: str
    data: bytes


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _clean_name(raw: bytes, index: int) -> str:
    """The upload's base name, decoded, without directories or control characters."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        name = raw.decode("latin-1")
    name = _UNSAFE.sub("", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()[:200]
    return name or f"upload-{index + 1}"


class _UploadReader:
    """Streaming ``multipart/form-data`` parser keeping the files of field ``files`` in memory, refusing
    (413) a file over the byte limit or one file too many as soon as the stream shows it."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.s = settings
        self.files: list[Upload] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._buf: bytearray | None = None  # current file's bytes; None for a non-file part
        self._other_fields = 0
        self._other_bytes = 0

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._buf = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > 16 * 1024:
            raise ServiceError(400, "bad_request", "a multipart header is too long")

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._disposition)
        field = opts.get(b"name", b"").decode("latin-1")
        if field != UPLOAD_FIELD:
            self._other_fields += 1
            if self._other_fields > _MAX_OTHER_FIELDS:
                raise ServiceError(400, "bad_request", f"more than {_MAX_OTHER_FIELDS} form fields")
            return
        if b"filename" not in opts:
            raise ServiceError(422, "bad_request", f"the form field {UPLOAD_FIELD!r} must hold file uploads")
        if len(self.files) >= self.s.max_files:
            raise ServiceError(413, "too_many_files", f"at most {self.s.max_files} files per request")
        self.files.append(Upload(_clean_name(opts[b"filename"], len(self.files)), b""))
        self._buf = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._buf is None:
            self._other_bytes += n
            if self._other_bytes > _MAX_OTHER_BYTES:
                raise ServiceError(400, "bad_request", "the non-file form fields are too large")
            return
        if len(self._buf) + n > self.s.max_upload_bytes:
            name = self.files[-1].name
            raise ServiceError(413, "too_large", f"{name} is larger than the limit of "
                               f"{self.s.max_upload_bytes / MiB:g} MiB per file", image=name)
        self._buf += data[start:end]

    def on_part_end(self) -> None:
        if self._buf is not None:
            self.files[-1].data = bytes(self._buf)
            self._buf = None

    async def read(self, request: Request) -> list[Upload]:
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data":
            raise ServiceError(415, "unsupported", f"send multipart/form-data with the images in the field "
                               f"{UPLOAD_FIELD!r}, not {ctype.decode('latin-1') or 'no content type'}")
        if b"boundary" not in params:
            raise ServiceError(400, "bad_request", "the multipart content type has no boundary")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.s.max_body_bytes:
            raise ServiceError(413, "too_large", f"the request body ({int(length) / MiB:.1f} MiB) is above the "
                               f"limit of {self.s.max_files} files x {self.s.max_upload_bytes / MiB:g} MiB")
        callbacks = {name: getattr(self, name) for name in (
            "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
            "on_header_end", "on_headers_finished")}
        parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
        total = 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > self.s.max_body_bytes:
                    raise ServiceError(413, "too_large", "the request body is above the limit of "
                                       f"{self.s.max_files} files x {self.s.max_upload_bytes / MiB:g} MiB")
                parser.write(chunk)
            parser.finalize()
        except FormParserError as e:
            raise ServiceError(400, "bad_request", f"malformed multipart body: {e}") from e
        except ClientDisconnect as e:
            raise ServiceError(400, "bad_request", "the client disconnected during the upload") from e
        if self._buf is not None:
            raise ServiceError(400, "bad_request", "the multipart body ends inside a file")
        if not self.files:
            raise ServiceError(422, "no_files", f"send one or more images in the multipart field {UPLOAD_FIELD!r}")
        return self.files


# -- app ----------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="Needed when the server runs with --token / $GEOSWC_TOKEN.")


def _require_token(request: Request,
                   creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    token = request.app.state.settings.token
    if not token:
        return
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
        raise ServiceError(401, "unauthorized", "this service needs 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": "Bearer"})


def _failure_dict(f: LocateFailure) -> dict[str, Any]:
    return {"image": f.image, "error": _message(f), "kind": f.kind, "status": KIND_STATUS.get(f.kind, 422)}


def _message(f: LocateFailure) -> str:
    """The library names byte inputs ``<uploaded image>``; name the upload instead."""
    return f.error.replace("<uploaded image>", f.image)


def _locate(geo: Geolocator, uploads: list[Upload], method: str) -> list[Prediction | LocateFailure]:
    """Runs in a worker thread: the library's batch prediction over the uploaded bytes."""
    return list(geo.locate_batch([u.data for u in uploads], names=[u.name for u in uploads],
                                 method=method, batch_size=min(8, len(uploads))))  # type: ignore[arg-type]


def _warmup(geo: Geolocator) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 200)).save(buf, format="JPEG")
    t0 = time.monotonic()
    try:
        geo.locate(buf.getvalue(), name="warm-up")
    except Exception:  # noqa: BLE001 - a failed warm-up must not stop the service; requests will report it
        log.exception("warm-up inference failed")
    else:
        log.info("warm-up inference in %.2f s", time.monotonic() - t0)


def _gate(app: FastAPI) -> InferenceGate:
    gate = getattr(app.state, "gate", None)
    if gate is None:
        s: ServiceSettings = app.state.settings
        gate = app.state.gate = InferenceGate(s.max_concurrent, s.max_queue, s.queue_timeout_s)
    return gate


def _csp(settings: ServiceSettings) -> str:
    img = "'self' data: blob:"
    if settings.tiles:
        u = urlsplit(settings.tiles)
        host = re.sub(r"\{[^}]*\}", "*", u.netloc)
        img += f" {u.scheme}://{host}"
    return (f"default-src 'self'; img-src {img}; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorModel, "description": text} for code, text in {
        400: "Malformed multipart body.",
        401: "Missing or wrong bearer token (only when the server has one).",
        413: "A file above the byte or pixel limit, or too many files.",
        415: "Not multipart/form-data, or (single file) not an image format the server reads.",
        422: "No file, or (single file) an empty, corrupt or truncated image.",
        503: "Busy: all inference slots and the wait queue are taken; see Retry-After.",
    }.items()
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [UPLOAD_FIELD],
            "properties": {UPLOAD_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                          "description": "One or more images (JPEG, PNG, WebP, GIF, BMP, "
                                                         "TIFF, HEIC); their file names name the results."}},
        }}},
    }
}

_METHODS = Literal["swc", "classification", "retrieval"]


def create_app(geolocator: Geolocator, settings: ServiceSettings | None = None) -> FastAPI:
    """The web service around a loaded :class:`~geoswc.api.Geolocator` (served with the image limits of
    ``settings``; the object passed in is not modified).

    Args:
        geolocator: the model to serve.
        settings: limits and options; default :class:`ServiceSettings`.
    """
    settings = settings or ServiceSettings()
    # A shallow copy shares the model and gallery but takes this app's limits, leaving the caller's object as is.
    geolocator = copy.copy(geolocator)
    geolocator.limits = settings.image_limits

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gate = InferenceGate(settings.max_concurrent, settings.max_queue, settings.queue_timeout_s)
        if settings.warmup:
            await run_in_threadpool(_warmup, geolocator)
        yield

    app = FastAPI(title="geoswc", version=__version__, lifespan=lifespan,
                  description="Where on Earth was this photo taken? Search-within-Cell image geolocation.")
    app.state.settings = settings
    app.state.geolocator = geolocator

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return ServiceError(500, "internal", "internal error; see the server log").response()

    @app.middleware("http")
    async def _headers(request: Request, call_next):  # Starlette's middleware signature
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    api = APIRouter(prefix="/api", dependencies=[Depends(_require_token)])

    @api.get("/health", response_model=HealthModel, responses={401: _ERRORS[401]})
    async def health() -> dict[str, Any]:
        """The served model's fingerprint, its gallery size and the package version."""
        g = geolocator.gallery
        return {"status": "ok", "version": __version__, "model_fingerprint": geolocator.fingerprint,
                "gallery_size": len(g) if g is not None else 0, "cells": len(geolocator.model.cells),
                "methods": ["swc", "classification", "retrieval"] if g is not None else ["classification"]}

    @api.post("/locate", response_model=list[PredictionModel | FailureModel], openapi_extra=_UPLOAD_BODY,
              responses={**_ERRORS, 500: {"model": ErrorModel, "description": "Internal error (see the log)."}})
    async def locate(request: Request, method: Annotated[_METHODS | None, Query(
            description="swc (default with a gallery), classification or retrieval")] = None) -> list[dict[str, Any]]:
        """Locate the photos of the multipart field ``files``, in order.

        Each result is a prediction (the JSON of ``geoswc locate --json``) or, for a photo that cannot be
        read, ``{image, error, kind, status}``. With a single file, such a failure is the answer itself:
        status 413, 415 or 422 with an error body. Request-level problems (too many files, a file over the
        byte limit, busy) fail the whole request.
        """
        from ..api import LocateFailure

        gate = _gate(request.app)
        chosen = method or ("swc" if geolocator.gallery is not None else "classification")
        async with gate.admit():
            uploads = await _UploadReader(settings).read(request)
            async with gate.slot():
                try:
                    results = await run_in_threadpool(_locate, geolocator, uploads, chosen)
                except GeoswcError as e:
                    raise ServiceError(422, "bad_request", str(e)) from e
                except Exception as e:
                    log.exception("locating %d uploaded file(s) failed", len(uploads))
                    raise ServiceError(500, "internal", "internal error while locating; see the server log") from e
        if len(results) == 1 and isinstance(results[0], LocateFailure):
            f = results[0]
            raise ServiceError(KIND_STATUS.get(f.kind, 422), f.kind, _message(f), image=f.image)
        for r in results:
            if isinstance(r, LocateFailure):
                log.info("upload %s: %s", r.image, r.error)
        return [_failure_dict(r) if isinstance(r, LocateFailure) else r.to_dict() for r in results]

    app.include_router(api)

    @app.get("/config.json", response_model=PageConfigModel, tags=["page"])
    async def page_config() -> dict[str, Any]:
        """What the map page needs: whether a token is required, the tile URL and the limits (public)."""
        s = settings
        return {"version": __version__, "auth_required": bool(s.token), "tiles": s.tiles,
                "tiles_attribution": s.tiles_attribution,
                "limits": LimitsModel(max_upload_bytes=s.max_upload_bytes, max_pixels=s.max_pixels,
                                      max_files=s.max_files, max_concurrent=s.max_concurrent,
                                      max_queue=s.max_queue).model_dump()}

    csp = _csp(settings)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
