"""The backbone registry's public face: every family registered (EfficientNet, and CLIP, DINOv2 and SigLIP through
Hugging Face ``transformers``), :func:`create_backbone`, the registry's default configs, and
:class:`BackboneChoice` (the ``--backbone.*`` flags).

Each entry carries its preprocessing, which is stored with every model built on it (timm's ``pretrained_cfg``
idea); see :mod:`geoswc.models.registry` for the types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from geoswc.core.config import BackboneConfig, Preprocess
from geoswc.core.errors import SettingError
from geoswc.models import efficientnet, hf_backbones  # noqa: F401 - importing them registers their families
from geoswc.models.registry import BUILDERS, TrunkBackbone, get_spec


def default_config(
    name: str = "efficientnet-lite0",
    image_size: int | None = None,
    resize: str | None = None,
    crop_fraction: float | None = None,
    interpolation: str | None = None,
) -> BackboneConfig:
    """The registry's config for ``name``, optionally at another input size, resize policy, evaluation crop or
    interpolation (each by default the backbone's own)."""
    spec = get_spec(name)
    pre = Preprocess(
        image_size=image_size or spec.image_size,
        mean=spec.mean,
        std=spec.std,
        resize=resize or spec.resize,  # type: ignore[arg-type]
        crop_fraction=spec.crop_fraction if crop_fraction is None else crop_fraction,
        interpolation=interpolation or spec.interpolation,  # type: ignore[arg-type]
    )
    return BackboneConfig(name=name, weights="default", feature_dim=spec.feature_dim, preprocess=pre)


def create_backbone(cfg: BackboneConfig, load_weights: bool = True) -> tuple[TrunkBackbone, BackboneConfig]:
    """Build a backbone and its resolved config (feature width, weights digest filled in).

    Args:
        cfg: which backbone, weights and preprocessing.
        load_weights: False builds the architecture only (the caller loads fine-tuned weights).
    """
    spec = get_spec(cfg.name)
    return BUILDERS[spec.family].build(spec, cfg, load_weights)


@dataclass(frozen=True)
class BackboneChoice:
    """Which registry backbone extracts features, at which input size (see ``geoswc backbones``)."""

    name: str = "efficientnet-lite0"
    """A registry name (``geoswc backbones`` lists them)."""
    weights: str = "default"
    """``default`` (the registry's pretrained weights: from a wheel, downloaded, or the Hugging Face cache),
    ``none`` (random), a local state-dict file (EfficientNets) or a folder holding a saved Hugging Face model
    (CLIP, DINOv2, SigLIP: offline use)."""
    image_size: int | None = None
    """Input side in pixels (default: the backbone's own)."""
    resize: Literal["center_crop", "squash"] | None = None
    """``center_crop`` (shorter side to the size, then the central square) or ``squash`` (whole image);
    default: the policy the backbone was trained with (``squash`` for SigLIP, else ``center_crop``)."""
    crop_fraction: float | None = None
    """Share of the resized side kept by the central crop, in [0.5, 1] (timm's ``crop_pct``: 0.875 resizes to
    256 and keeps the central 224); default: the backbone's own (1.0 for every registered one)."""
    interpolation: Literal["bicubic", "bilinear"] | None = None
    """Resampling of the resizes; default: the backbone's own (``bicubic`` for every registered one)."""

    def __post_init__(self) -> None:
        """Refuse a bad crop or interpolation now, naming this group's flag (the rules are :class:`Preprocess`'s)."""
        given = {"crop_fraction": self.crop_fraction, "interpolation": self.interpolation}
        try:
            Preprocess(**{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]
        except SettingError as e:
            raise SettingError(str(e), type(self), e.field) from e

    def resolve(self) -> BackboneConfig:
        """The backbone config (registry preprocessing, this size, crop and weights); the digest and width are
        filled in when the backbone is created."""
        base = default_config(self.name, self.image_size, self.resize, self.crop_fraction, self.interpolation)
        return dataclasses.replace(base, weights=self.weights)
