"""The config dataclasses, under the import path the documentation uses (``from geoswc.config import CellConfig``).
They live in :mod:`geoswc.core.config`, the layer every other one builds on."""

from geoswc.core.config import (
    BackboneConfig,
    CellConfig,
    GalleryCodes,
    HeadConfig,
    ModelConfig,
    Preprocess,
    RunConfig,
    SearchConfig,
    TrainConfig,
)

__all__ = [
    "BackboneConfig",
    "CellConfig",
    "GalleryCodes",
    "HeadConfig",
    "ModelConfig",
    "Preprocess",
    "RunConfig",
    "SearchConfig",
    "TrainConfig",
]
