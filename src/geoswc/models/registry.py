"""The backbone registry's types (in the manner of timm's ``_registry``/``pretrained_cfg``): a
:class:`BackboneSpec` per entry with its preprocessing and a typed weights source, the builder of each family,
and the one loader that turns a weights choice into something a builder reads (:func:`resolve_weights`).

The families fill the registry when imported: :mod:`geoswc.models.efficientnet` and
:mod:`geoswc.models.hf_backbones`, both imported by :mod:`geoswc.models.backbone`, the registry's public face.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.hub import download_url_to_file, get_dir

from geoswc.core.config import BackboneConfig, canonical_json, digest, to_dict
from geoswc.core.errors import ArtifactError, InputError, SettingError

log = logging.getLogger(__name__)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""ImageNet's channel mean and standard deviation."""


@dataclass(frozen=True)
class WheelWeights:
    """Weights shipped in an installed Python package (offline): ``package.attr.get_model_file_path()``."""

    package: str
    attr: str

    def describe(self) -> str:
        return "offline (wheel)"


@dataclass(frozen=True)
class UrlWeights:
    """Weights downloaded on first use into torch's hub cache."""

    url: str

    def describe(self) -> str:
        return "downloaded on first use"


@dataclass(frozen=True)
class HubWeights:
    """Weights in the Hugging Face cache (downloaded there on first use)."""

    repo: str

    def describe(self) -> str:
        return f"Hugging Face {self.repo}"


WeightsSource = WheelWeights | UrlWeights | HubWeights


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry."""

    name: str
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: WeightsSource
    """Where the default weights come from."""
    family: str = "efficientnet"
    """The family whose builder makes it: ``efficientnet``, ``efficientnet-lite``, ``clip``, ``dinov2`` or
    ``siglip``."""
    resize: str = "center_crop"
    """The resize policy the weights were trained with (the default of ``--backbone.resize``)."""
    crop_fraction: float = 1.0
    """The evaluation crop the weights were trained with (timm's ``crop_pct``; see :class:`Preprocess`)."""
    interpolation: str = "bicubic"
    """The resampling the weights were trained with: ``bicubic`` or ``bilinear``."""
    params_m: float = 0.0
    """Parameters of the feature extractor, millions (checked against the architecture by the tests)."""
    arch: tuple[tuple[str, Any], ...] = ()
    """Hugging Face entries: the architecture's config (``…Config(**dict(arch))``), so that random weights
    and fine-tuned models need no download."""

    @property
    def offline(self) -> bool:
        return isinstance(self.weights_source, WheelWeights)

    @property
    def source(self) -> str:
        """Where the default weights come from, in words."""
        return self.weights_source.describe()


class TrunkBackbone(nn.Module):
    """A feature extractor ``(B, 3, S, S)`` -> ``(B, D)`` built of a stem, a sequence of blocks and a
    pooling tail; :meth:`train_last_blocks` freezes all but the last blocks for fine-tuning."""

    feature_dim: int

    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks, input side first."""
        raise NotImplementedError

    def train_last_blocks(self, n: int) -> int:
        """Train only the last ``n`` blocks and what follows them (0: the whole backbone); the stem and the
        earlier blocks are frozen, their batch statistics included. Returns the number of trainable tensors."""
        blocks = self.blocks()
        if not 0 <= n <= len(blocks):
            raise SettingError(
                f"finetune_blocks must be in 0..{len(blocks)} for this backbone, got {n}", None, "finetune_blocks"
            )
        first = next(blocks[-n].parameters()) if n else None
        trainable = first is None
        for p in self.parameters():
            trainable = trainable or p is first
            p.requires_grad_(trainable)
        self.train(self.training)
        return sum(p.requires_grad for p in self.parameters())

    def _frozen_norms(self) -> Iterator[nn.Module]:
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                yield m

    def train(self, mode: bool = True) -> TrunkBackbone:
        """Frozen batch-norm layers keep their statistics (evaluation mode) while the rest trains."""
        super().train(mode)
        if mode:
            for m in self._frozen_norms():
                m.eval()
        return self


BuildFn = Callable[[BackboneSpec, BackboneConfig, bool], tuple[TrunkBackbone, BackboneConfig]]
"""``(spec, config, load_weights) -> (backbone, resolved config)``: a family's constructor."""


@dataclass(frozen=True)
class Builder:
    """How a family's entries become backbones, and what their features are."""

    build: BuildFn
    pooled: str
    """The pooled output used as features, in words."""


REGISTRY: dict[str, BackboneSpec] = {}
"""Every backbone by name, filled by the families' modules."""
BUILDERS: dict[str, Builder] = {}
"""Each family's builder."""


def register_family(family: str, builder: Builder, specs: Sequence[BackboneSpec] = ()) -> None:
    """Register a family's builder and its entries (a plug-in adds its own family this way)."""
    BUILDERS[family] = builder
    for spec in specs:
        register_backbone(spec)


def register_backbone(spec: BackboneSpec) -> None:
    """Add a registry entry of a registered family (tests register tiny random architectures this way).

    Raises:
        InputError: the name is taken, or its family has no builder.
    """
    if spec.name in REGISTRY:
        raise InputError(f"backbone {spec.name!r} is already registered")
    if spec.family not in BUILDERS:
        raise InputError(f"backbone {spec.name!r}: no family {spec.family!r} is registered ({', '.join(BUILDERS)})")
    REGISTRY[spec.name] = spec


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(REGISTRY)}") from None


def resolve_weights(spec: BackboneSpec, weights: str) -> Path | HubWeights | None:
    """The one weights loader: ``none`` is no weights, a path is a local file or folder (checked to exist),
    ``default`` the spec's source: a wheel's file, a downloaded file, or the Hugging Face cache entry (read by
    the Hugging Face family). Downloads happen only here, when a user asks for those weights (never at import
    or in tests)."""
    if weights == "none":
        return None
    if weights != "default":
        p = Path(weights)
        if not p.exists():
            raise InputError(f"backbone weights not found: {p}")
        return p
    source = spec.weights_source
    if isinstance(source, HubWeights):
        return source
    if isinstance(source, WheelWeights):
        try:
            mod = importlib.import_module(source.package)
        except ImportError as e:
            name = source.package.replace("_", "-")
            raise ArtifactError(
                f"{spec.name} weights come from the package {name}, which is not installed: pip install {name}"
            ) from e
        return Path(getattr(mod, source.attr).get_model_file_path())
    return _download(spec.name, source.url)


def _download(name: str, url: str) -> Path:
    dest = Path(get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not dest.is_file():
        log.info("downloading %s weights from %s", name, url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(url, str(dest), progress=True)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise ArtifactError(
                f"could not download {name} weights from {url} ({e}); download the file by hand "
                "and pass it with --backbone.weights PATH"
            ) from e
    return dest


def check_weights_digest(cfg: BackboneConfig, sha: str, where: str) -> None:
    """Refuse initial weights other than those a model or feature cache was made with."""
    if cfg.weights_sha256 and cfg.weights_sha256 != sha:
        raise ArtifactError(
            f"the {cfg.name} weights {where} differ from the ones this model was built with "
            f"(sha256 {sha[:12]}… vs {cfg.weights_sha256[:12]}…); install the same package version, use the same "
            "weights, or rebuild the model"
        )


def backbone_fingerprint(cfg: BackboneConfig) -> str:
    """Digest of the backbone config, weights digest included: equal fingerprints, equal features."""
    return digest(canonical_json(to_dict(cfg)))
