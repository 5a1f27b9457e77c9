"""The one compatibility check between artifacts: a model and its cell table, its gallery, and features.

Every artifact records the fingerprints of what it was built with; :func:`check` compares them and refuses
a mix with a :class:`~geoswc.core.errors.ModelMismatchError` that names both sides and the fix. Loading a model
checks its cell table, a :class:`~geoswc.prediction.geolocator.Geolocator` checks its gallery, and ``index`` and
``train`` check the features they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from geoswc.core.errors import ModelMismatchError
from geoswc.geo.cells import check_cells

if TYPE_CHECKING:
    import torch

    from geoswc.gallery.search import Gallery
    from geoswc.models.geomodel import GeoModel


class Features(Protocol):
    """What the check reads of a feature set (:class:`geoswc.training.features.FeatureSet`)."""

    @property
    def backbone_fingerprint(self) -> str: ...
    @property
    def features(self) -> torch.Tensor: ...


class Fitted(Protocol):
    """What the check reads of a calibrator (:class:`geoswc.prediction.calibration.Calibrator`)."""

    @property
    def model(self) -> str: ...


def check(
    model: GeoModel,
    *,
    gallery: Gallery | None = None,
    features: Features | None = None,
    calibrator: Fitted | None = None,
    where: str = "",
) -> None:
    """Refuse a gallery, a feature set or a calibrator that another model, cell table or backbone made.

    Args:
        model: the model in use.
        gallery: must have been embedded by ``model`` and grouped by its cells.
        features: must come from ``model``'s backbone (fine-tuned weights included) and have its width.
        calibrator: must have been fitted for ``model`` (its fingerprint).
        where: the artifact's path, for the message (default: the folder a gallery was loaded from).

    Raises:
        ModelMismatchError: naming both fingerprints and the command that rebuilds the artifact.
    """
    check_cells(model.config, model.cells)
    if gallery is not None:
        at = f" in {where or gallery.source}" if where or gallery.source else ""
        ident = gallery.identity
        if ident.model_fingerprint != model.fingerprint:
            raise ModelMismatchError(
                f"the gallery index{at} was built with model {ident.model_fingerprint}, but "
                f"the model in use is {model.fingerprint}; rebuild it with `geoswc index`"
            )
        if ident.cells_fingerprint != model.cells.fingerprint or ident.num_cells != len(model.cells):
            raise ModelMismatchError(
                f"the gallery index{at} is grouped by cell table {ident.cells_fingerprint} "
                f"({ident.num_cells} cells), the model's is {model.cells.fingerprint} "
                f"({len(model.cells)} cells); rebuild it with `geoswc index`"
            )
        if len(gallery) and gallery.dim != model.config.backbone.feature_dim:
            raise ModelMismatchError(
                f"the gallery index{at} holds {gallery.dim}-d embeddings, the model makes "
                f"{model.config.backbone.feature_dim}-d ones; rebuild it with `geoswc index`"
            )
    if calibrator is not None and calibrator.model != model.fingerprint:
        at = f" in {where}" if where else ""
        raise ModelMismatchError(
            f"the calibrator{at} was fitted for model {calibrator.model}, but the model in use is "
            f"{model.fingerprint}; refit it with `geoswc calibrate`"
        )
    if features is not None:
        at = f" in {where}" if where else ""
        if features.backbone_fingerprint != model.backbone_fingerprint:
            raise ModelMismatchError(
                f"the features{at} come from backbone {features.backbone_fingerprint}, the "
                f"model's is {model.backbone_fingerprint}; extract them with the model's "
                "backbone (`geoswc features --model ...`)"
            )
        if features.features.shape[-1] != model.config.backbone.feature_dim:
            raise ModelMismatchError(
                f"the features{at} are {features.features.shape[-1]}-d, the model expects "
                f"{model.config.backbone.feature_dim}-d"
            )
