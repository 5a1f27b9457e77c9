"""``geoswc serve``: the web service and map page under uvicorn. Heavy imports stay inside :func:`cmd_serve`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("geoswc.service")

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(v: str) -> int:
    p = int(v)
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {p}")
    return p


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the ``geoswc`` subparsers."""
    sp = sub.add_parser(
        "serve", help="Run the web service and its map page.",
        description="Run the web service (POST /api/locate, GET /api/health, OpenAPI at /docs) and the map page "
                    "at / on the embedded model or --model. Limits default to the environment variables named "
                    "in brackets, else to the value shown.")
    sp.set_defaults(func=cmd_serve)
    sp.add_argument("--host", default="127.0.0.1",
                    help="interface to bind; keep localhost unless behind a proxy (default: 127.0.0.1)")
    sp.add_argument("--port", type=_port, default=8000, help="TCP port; 0 picks a free one (default: 8000)")
    sp.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    sp.add_argument("--index", type=Path, default=None, help="gallery index folder (default: MODEL/index)")
    g = sp.add_argument_group("limits and options")
    g.add_argument("--max-upload-mb", type=float, default=None,
                   help="largest file in MiB, refused with 413 while uploading [GEOSWC_MAX_UPLOAD_MB; 20]")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="largest image in pixels (width x height), else 413 [GEOSWC_MAX_PIXELS; 50000000]")
    g.add_argument("--max-files", type=int, default=None,
                   help="most files per request, else 413 [GEOSWC_MAX_FILES; 16]")
    g.add_argument("--max-concurrent", type=int, default=None,
                   help="requests running inference at once [GEOSWC_MAX_CONCURRENT; 2]")
    g.add_argument("--max-queue", type=int, default=None,
                   help="further requests allowed to wait; beyond, 503 + Retry-After [GEOSWC_MAX_QUEUE; 8]")
    g.add_argument("--queue-timeout", type=float, default=None,
                   help="seconds a request may wait for a slot before 503 [GEOSWC_QUEUE_TIMEOUT; 30]")
    g.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on /api/* [GEOSWC_TOKEN, preferred: a flag is "
                        "visible to other users in the process list]")
    g.add_argument("--tiles", default=None,
                   help="tile URL template for the page's base map, e.g. https://tile.example.org/{z}/{x}/{y}.png "
                        "(default: offline Natural Earth outlines) [GEOSWC_TILES]")
    g.add_argument("--tiles-attribution", default=None, help="attribution of the tiles [GEOSWC_TILES_ATTRIBUTION]")
    return sp


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, build the app and run uvicorn until interrupted."""
    import uvicorn

    from ..api import Geolocator
    from .app import MiB, ServiceSettings, create_app

    settings = ServiceSettings.from_env(
        max_upload_bytes=int(args.max_upload_mb * MiB) if args.max_upload_mb is not None else None,
        max_pixels=args.max_pixels, max_files=args.max_files, max_concurrent=args.max_concurrent,
        max_queue=args.max_queue, queue_timeout_s=args.queue_timeout, token=args.token, tiles=args.tiles,
        tiles_attribution=args.tiles_attribution)
    geo = Geolocator.load(args.model, args.index, limits=settings.image_limits)
    if not _is_loopback(args.host) and not settings.token:
        log.warning("serving on %s without a token: anyone who can reach it can use it (set GEOSWC_TOKEN)",
                    args.host)
    log.info("model %s, gallery of %d photos; limits: %g MiB/file, %d pixels, %d files/request, "
             "%d concurrent + %d queued", geo.fingerprint, len(geo.gallery) if geo.gallery is not None else 0,
             settings.max_upload_bytes / MiB, settings.max_pixels, settings.max_files, settings.max_concurrent,
             settings.max_queue)
    app = create_app(geo, settings)
    level = logging.getLogger("geoswc").getEffectiveLevel()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if level <= logging.INFO else "warning",
                server_header=False, timeout_graceful_shutdown=5)
    return 0
