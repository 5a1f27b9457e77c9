"""The command options' dataclasses, under the import path the documentation uses (``from geoswc.options import
Photos``). Each lives in its layer: :class:`Photos` in :mod:`geoswc.data.sources`, :class:`RunConfig` in
:mod:`geoswc.core.config`, :class:`BackboneChoice` in :mod:`geoswc.models.backbone`."""

from geoswc.core.config import RunConfig
from geoswc.data.sources import Photos
from geoswc.models.backbone import BackboneChoice

__all__ = ["BackboneChoice", "Photos", "RunConfig"]
