"""geoswc: where on Earth was this photo taken? Search-within-Cell image geolocation.

>>> from geoswc import Geolocator
>>> Geolocator.load().locate("photo.jpg")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from geoswc.core.errors import GeoswcError
from geoswc.core.version import __version__
from geoswc.prediction.results import LocateFailure, Prediction

__all__ = ["Geolocator", "Prediction", "LocateFailure", "GeoswcError", "set_threads", "__version__"]

if TYPE_CHECKING:
    from geoswc.core.threads import set_threads
    from geoswc.prediction.geolocator import Geolocator


def __getattr__(name: str) -> Any:
    if name == "Geolocator":
        from geoswc.prediction.geolocator import Geolocator  # lazy: torch loads on first use, not on `import geoswc`

        return Geolocator
    if name == "set_threads":  # what --run.threads does, for Python callers of Geolocator
        from geoswc.core.threads import set_threads  # lazy: it imports torch, which `import geoswc` does not

        return set_threads
    raise AttributeError(f"module 'geoswc' has no attribute {name!r}")
