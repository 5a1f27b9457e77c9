"""The web service: ``geoswc serve`` runs :func:`create_app` under uvicorn (FastAPI, a map page at ``/``).

Needs the ``fastapi``, ``uvicorn`` and ``python-multipart`` packages; nothing is imported until used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ServiceSettings", "create_app"]

if TYPE_CHECKING:
    from .app import create_app
    from .settings import ServiceSettings


def __getattr__(name: str) -> Any:
    if name == "ServiceSettings":
        from .settings import ServiceSettings

        return ServiceSettings
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'geoswc.service' has no attribute {name!r}")
