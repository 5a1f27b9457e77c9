"""geoswc: where on Earth was this photo taken? Search-within-Cell image geolocation.

>>> from geoswc import Geolocator
>>> Geolocator.load().locate("photo.jpg")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Geolocator", "Prediction", "LocateFailure", "GeoswcError", "__version__"]

if TYPE_CHECKING:
    from .api import Geolocator
    from .errors import GeoswcError
    from .prediction import LocateFailure, Prediction


def __getattr__(name: str) -> Any:
    # Lazy: `import geoswc` stays cheap (no torch import) until the API is used.
    if name == "Geolocator":
        from .api import Geolocator

        return Geolocator
    if name in ("Prediction", "LocateFailure"):
        from . import prediction

        return getattr(prediction, name)
    if name == "GeoswcError":
        from .errors import GeoswcError

        return GeoswcError
    raise AttributeError(f"module 'geoswc' has no attribute {name!r}")
