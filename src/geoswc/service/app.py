"""The FastAPI application: ``POST /api/locate``, ``GET /api/health``, ``GET /api/thumbnails/{row}``, and the map
page at ``/``.

Every prediction goes through :meth:`geoswc.prediction.geolocator.Geolocator.locate_batch` (the one prediction
path), in a worker thread, behind a bounded admission gate (:mod:`.gate`); uploads are read by :mod:`.uploads`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from geoswc.core.config import Method, to_dict
from geoswc.core.errors import ArtifactError, GeoswcError, ImageError
from geoswc.core.version import __version__
from geoswc.data.images import open_image
from geoswc.gallery.thumbnails import digest
from geoswc.prediction.results import LocateFailure
from geoswc.service.gate import KIND_STATUS, InferenceGate, ServiceError
from geoswc.service.schemas import ErrorModel, FailureModel, HealthModel, LimitsModel, PageConfigModel, PredictionModel
from geoswc.service.settings import ServiceSettings
from geoswc.service.uploads import UPLOAD_FIELD, Upload, UploadReader

if TYPE_CHECKING:
    from geoswc.prediction.geolocator import Geolocator
    from geoswc.prediction.results import Result

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

_bearer = HTTPBearer(auto_error=False, description="Needed when the server runs with a token ($GEOSWC_TOKEN).")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorModel, "description": text}
    for code, text in {
        400: "Malformed multipart body.",
        401: "Missing or wrong bearer token (only when the server has one).",
        413: "A file above the byte or pixel limit, or too many files.",
        415: "Not multipart/form-data, or (single file) not an image format the server reads.",
        422: "No file, or (single file) an empty, corrupt or truncated image.",
        500: "Internal error (see the server log).",
        503: "Busy: all inference slots and the wait queue are taken; see Retry-After.",
    }.items()
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {
                        UPLOAD_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more images (JPEG, PNG, WebP, GIF, BMP, "
                            "TIFF, HEIC); their file names name the results.",
                        }
                    },
                }
            }
        },
    }
}


def _require_token(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    token = request.app.state.settings.token
    if not token:
        return
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
        raise ServiceError(
            401,
            "unauthorized",
            "this service needs 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def locate_uploads(geo: Geolocator, uploads: list[Upload], method: Method) -> list[Result]:
    """Runs in a worker thread: the library's batch prediction over the uploaded bytes, named by the uploads."""
    return list(
        geo.locate_batch(
            [u.data for u in uploads], names=[u.name for u in uploads], method=method, batch_size=min(8, len(uploads))
        )
    )


def _warmup(geo: Geolocator) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 200)).save(buf, format="JPEG")
    t0 = time.monotonic()
    try:
        geo.locate(buf.getvalue(), name="warm-up")
    except Exception:  # noqa: BLE001 - a failed warm-up must not stop the service; requests will report it
        log.exception("warm-up inference failed")
    else:
        log.info("warm-up inference in %.2f s", time.monotonic() - t0)


def _gate(app: FastAPI, new: bool = False) -> InferenceGate:
    """The app's admission gate, made from its settings on first use (``new``: anew, at each start-up)."""
    gate = None if new else getattr(app.state, "gate", None)
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
    return (
        f"default-src 'self'; img-src {img}; style-src 'self' 'unsafe-inline'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )


def _check_request_pixels(uploads: list[Upload], settings: ServiceSettings) -> None:
    """Refuse (413) a request whose photos together hold more pixels than it may decode; a photo whose header
    does not open counts for nothing here (it fails on its own later)."""
    total = 0
    for u in uploads:
        try:
            w, h = open_image(u.data, settings.image_limits, u.name).size
        except ImageError:
            continue
        total += w * h
    if total > settings.max_request_pixels:
        raise ServiceError(
            413,
            "too_large",
            f"the request's photos hold {total / 1e6:.0f} MP together, above the "
            f"limit of {settings.max_request_pixels / 1e6:.0f} MP; send fewer or smaller photos",
        )


async def _locate_request(
    request: Request, geolocator: Geolocator, settings: ServiceSettings, method: Method
) -> list[dict[str, Any]]:
    """Admit, read the uploads, wait for an inference slot, locate; a lone failure is the answer itself."""
    gate = _gate(request.app)
    async with gate.admit():
        uploads = await UploadReader(settings).read(request)
        _check_request_pixels(uploads, settings)
        async with gate.slot():
            try:
                results = await run_in_threadpool(locate_uploads, geolocator, uploads, method)
            except GeoswcError as e:
                raise ServiceError(422, "bad_request", str(e)) from e
            except Exception as e:
                log.exception("locating %d uploaded file(s) failed", len(uploads))
                raise ServiceError(500, "internal", "internal error while locating; see the server log") from e
    if len(results) == 1 and isinstance(results[0], LocateFailure):
        f = results[0]
        raise ServiceError(KIND_STATUS.get(f.kind, 422), f.kind, f.error, image=f.image)
    out = []
    for r in results:
        if isinstance(r, LocateFailure):
            log.info("upload %s: %s", r.image, r.error)
            out.append({**r.to_dict(), "status": KIND_STATUS.get(r.kind, 422)})
        else:
            out.append(r.to_dict())
    return out


_THUMBNAIL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/jpeg": {}}, "description": "The thumbnail (a baseline JPEG)."},
    401: _ERRORS[401],
    404: {"model": ErrorModel, "description": "No such gallery row, or the index holds no thumbnail of it."},
    500: {"model": ErrorModel, "description": "The stored thumbnail is damaged (it is never served then)."},
}


def read_thumbnail(geo: Geolocator, row: int) -> bytes:
    """Runs in a worker thread: the JPEG of gallery row ``row``, checked against its digest (404: none; 500:
    damaged). Only ever read from the index, by row."""
    g = geo.gallery
    if g is None or g.thumbnails is None:
        raise ServiceError(
            404,
            "not_found",
            "the served gallery index holds no thumbnails (build one with `geoswc index --thumbnails 128`)",
        )
    if not 0 <= row < len(g):
        raise ServiceError(404, "not_found", f"no gallery row {row}: the served index has {len(g)} rows")
    try:
        data = g.thumbnail(row)
    except ArtifactError as e:
        log.error("%s", e)
        raise ServiceError(500, "damaged", f"the thumbnail of gallery row {row} is damaged; see the server log") from e
    if data is None:
        raise ServiceError(404, "not_found", f"gallery row {row} has no thumbnail")
    return data


def _api(geolocator: Geolocator, settings: ServiceSettings) -> APIRouter:
    api = APIRouter(prefix="/api", dependencies=[Depends(_require_token)])

    @api.get("/health", response_model=HealthModel, responses={401: _ERRORS[401]})
    async def health() -> dict[str, Any]:
        """The served model's fingerprint, its gallery size and the package version."""
        g = geolocator.gallery
        return {
            "status": "ok",
            "version": __version__,
            "model_fingerprint": geolocator.fingerprint,
            "gallery_size": len(g) if g is not None else 0,
            "cells": len(geolocator.model.cells),
            "methods": list(geolocator.methods),
        }

    @api.post(
        "/locate", response_model=list[PredictionModel | FailureModel], openapi_extra=_UPLOAD_BODY, responses=_ERRORS
    )
    async def locate(
        request: Request,
        method: Annotated[
            Method | None, Query(description="swc (default with a gallery), classification or retrieval")
        ] = None,
    ) -> list[dict[str, Any]]:
        """Locate the photos of the multipart field ``files``, in order.

        Each result is a prediction (the JSON of ``geoswc locate --format jsonl``) or, for a photo that cannot
        be read, ``{image, error, kind, status}``. With a single file, such a failure is the answer itself:
        status 413, 415 or 422 with an error body. Request-level problems (too many files, a file over the
        byte limit, busy) fail the whole request.
        """
        return await _locate_request(request, geolocator, settings, method or geolocator.methods[0])

    @api.get("/thumbnails/{row}", response_class=Response, responses=_THUMBNAIL_RESPONSES)
    async def thumbnail(
        request: Request,
        row: Annotated[
            int, PathParam(ge=0, description="A neighbour's gallery row (its `row`, when its `thumbnail` is true).")
        ],
    ) -> Response:
        """The thumbnail of a retrieved gallery photo (an index built with ``geoswc index --thumbnails``), read
        from the served index by row and checked against its digest."""
        data = await run_in_threadpool(read_thumbnail, geolocator, row)
        etag = f'"{digest(data):016x}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    return api


def _page(app: FastAPI, settings: ServiceSettings, geolocator: Geolocator) -> None:
    csp = _csp(settings)
    rule = to_dict(geolocator.rule) if geolocator.calibrator is not None else None

    @app.get("/config.json", response_model=PageConfigModel, tags=["page"])
    async def page_config() -> dict[str, Any]:
        """What the map page needs: whether a token is required, the tile URL, the limits and the localizable rule
        (public)."""
        s = settings
        return {
            "version": __version__,
            "auth_required": bool(s.token),
            "tiles": s.tiles,
            "localizable_rule": rule,
            "select_km": geolocator.search.select_km,
            "tiles_attribution": s.tiles_attribution,
            "limits": LimitsModel(
                max_upload_bytes=s.max_upload_bytes,
                max_pixels=s.max_pixels,
                max_files=s.max_files,
                max_concurrent=s.max_concurrent,
                max_queue=s.max_queue,
            ).model_dump(),
        }

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The interactive API docs, served from the package (no CDN: they work offline)."""
        vendor = "/static/vendor/swagger-ui"
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="geoswc API",
            swagger_js_url=f"{vendor}/swagger-ui-bundle.js",
            swagger_css_url=f"{vendor}/swagger-ui.css",
            swagger_favicon_url=f"{vendor}/favicon-32x32.png",
        )

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def create_app(geolocator: Geolocator, settings: ServiceSettings | None = None) -> FastAPI:
    """The web service around a loaded :class:`~geoswc.prediction.geolocator.Geolocator` (served with the image
    limits of ``settings``; the object passed in is not modified).

    Args:
        geolocator: the model to serve.
        settings: limits and options; default :class:`ServiceSettings`.
    """
    settings = settings or ServiceSettings()
    geolocator = geolocator.with_settings(limits=settings.image_limits)  # the caller's object is left as it is

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _gate(app, new=True)
        if settings.warmup:
            await run_in_threadpool(_warmup, geolocator)
        yield

    app = FastAPI(
        title="geoswc",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Where on Earth was this photo taken? Search-within-Cell image geolocation.",
    )
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

    app.include_router(_api(geolocator, settings))
    _page(app, settings, geolocator)
    return app


def run_server(geolocator: Geolocator, settings: ServiceSettings, host: str, port: int) -> None:
    """Serve :func:`create_app` with uvicorn until interrupted."""
    import uvicorn  # lazy: needed only to serve

    level = logging.getLogger("geoswc").getEffectiveLevel()
    uvicorn.run(
        create_app(geolocator, settings),
        host=host,
        port=port,
        server_header=False,
        log_level="info" if level <= logging.INFO else "warning",
        timeout_graceful_shutdown=5,
    )
