"""The web service: ``geoswc serve`` runs :func:`create_app` under uvicorn (FastAPI, a map page at ``/``).

Needs the ``fastapi``, ``uvicorn`` and ``python-multipart`` packages; nothing is imported until used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ServiceSettings", "create_app"]

if TYPE_CHECKING:
    from .app import ServiceSettings, create_app


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'geoswc.service' has no attribute {name!r}")
