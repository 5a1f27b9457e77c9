"""Foundation backbones through Hugging Face ``transformers`` (the optional extra ``geoswc[hf]``): CLIP,
DINOv2 and SigLIP vision towers as registry entries (see :data:`geoswc.models.registry.REGISTRY`).

``transformers`` is imported only when such a backbone is built. Weights come from the Hugging Face cache
(downloaded there on first use, by one process: under torchrun the ranks only read the cache), or from a
local folder saved by ``save_pretrained`` / ``hf download --local-dir`` (``--backbone.weights DIR``), read
from ``.safetensors`` only. ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) keeps the loader off the
network.

The pooled output of each family (one vector per image, the features SwC's heads are trained on):

- ``clip``: the projected image embedding (``image_embeds``: the CLS token after the final layer norm and
  the visual projection), CLIP's joint image-text space, as GeoCLIP uses;
- ``dinov2``: the CLS token after the final layer norm (``pooler_output``), DINOv2's global descriptor;
- ``siglip``: the attention-pooled embedding of the MAP head (``pooler_output``), SigLIP's image embedding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoswc.core import distributed
from geoswc.core.config import BackboneConfig
from geoswc.core.errors import ArtifactError, GeoswcError, InputError
from geoswc.core.progress import interactive, quiet
from geoswc.core.tensor_files import state_digest
from geoswc.models.registry import (
    IMAGENET,
    BackboneSpec,
    Builder,
    HubWeights,
    TrunkBackbone,
    check_weights_digest,
    register_family,
    resolve_weights,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'geoswc[hf]'"

_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _vit(hidden: int, layers: int, heads: int, patch: int, **more: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(
        sorted(
            dict(
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch, **more
            ).items()
        )
    )


SPECS = [
    BackboneSpec(
        "clip-vit-l14",
        768,
        224,
        *_CLIP,
        HubWeights("openai/clip-vit-large-patch14"),
        "clip",
        params_m=303.97,
        arch=_vit(1024, 24, 16, 14, intermediate_size=4096, projection_dim=768, image_size=224),
    ),
    BackboneSpec(
        "clip-vit-b16",
        512,
        224,
        *_CLIP,
        HubWeights("openai/clip-vit-base-patch16"),
        "clip",
        params_m=86.19,
        arch=_vit(768, 12, 12, 16, intermediate_size=3072, projection_dim=512, image_size=224),
    ),
    BackboneSpec(
        "clip-vit-b32",
        512,
        224,
        *_CLIP,
        HubWeights("openai/clip-vit-base-patch32"),
        "clip",
        params_m=87.85,
        arch=_vit(768, 12, 12, 32, intermediate_size=3072, projection_dim=512, image_size=224),
    ),
    BackboneSpec(
        "dinov2-small",
        384,
        224,
        *IMAGENET,
        HubWeights("facebook/dinov2-small"),
        "dinov2",
        params_m=22.06,
        arch=_vit(384, 12, 6, 14, image_size=518),
    ),
    BackboneSpec(
        "dinov2-base",
        768,
        224,
        *IMAGENET,
        HubWeights("facebook/dinov2-base"),
        "dinov2",
        params_m=86.58,
        arch=_vit(768, 12, 12, 14, image_size=518),
    ),
    BackboneSpec(
        "siglip-base",
        768,
        224,
        *_HALF,
        HubWeights("google/siglip-base-patch16-224"),
        "siglip",
        "squash",
        params_m=92.88,
        arch=_vit(768, 12, 12, 16, intermediate_size=3072, image_size=224),
    ),
]


@dataclass(frozen=True)
class Family:
    """How a ``transformers`` vision model becomes a backbone: its classes, blocks and pooled output."""

    config_class: str
    model_class: str
    blocks: tuple[str, ...]
    """Attribute paths of the transformer blocks in the model (the first that exists: they moved between
    ``transformers`` versions)."""
    pooled: str
    """The output field used as features."""
    pooled_doc: str
    interpolate: bool
    """Whether other input sizes than the config's need ``interpolate_pos_encoding=True`` (DINOv2 always
    interpolates)."""


FAMILIES: dict[str, Family] = {
    "clip": Family(
        "CLIPVisionConfig",
        "CLIPVisionModelWithProjection",
        ("vision_model.encoder.layers",),
        "image_embeds",
        "projected image embedding",
        True,
    ),
    "dinov2": Family(
        "Dinov2Config",
        "Dinov2Model",
        ("encoder.layer",),
        "pooler_output",
        "CLS token after the final layer norm",
        False,
    ),
    "siglip": Family(
        "SiglipVisionConfig",
        "SiglipVisionModel",
        ("vision_model.encoder.layers", "encoder.layers"),
        "pooler_output",
        "attention-pooled (MAP head) embedding",
        True,
    ),
}


def require_transformers() -> Any:
    """Import ``transformers``, or fail with the install command."""
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise GeoswcError(
            f"the CLIP, DINOv2 and SigLIP backbones need the optional package 'transformers', "
            f"which is not installed: {INSTALL_HINT}"
        ) from e


class HFBackbone(TrunkBackbone):
    """A ``transformers`` vision tower and its pooled output: ``(B, 3, S, S)`` -> ``(B, D)``."""

    def __init__(self, net: nn.Module, family: str, feature_dim: int, interpolate: bool) -> None:
        super().__init__()
        self.net, self.family, self.feature_dim = net, family, feature_dim
        self.interpolate = interpolate and FAMILIES[family].interpolate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = {"interpolate_pos_encoding": True} if self.interpolate else {}
        return getattr(self.net(pixel_values=x, **kw), FAMILIES[self.family].pooled)

    def blocks(self) -> nn.ModuleList:
        for path in FAMILIES[self.family].blocks:
            with contextlib.suppress(AttributeError):
                return operator.attrgetter(path)(self.net)
        raise GeoswcError(f"cannot find the blocks of this {type(self.net).__name__} (transformers version?)")


def offline() -> bool:
    """Whether the Hugging Face hub must not be reached (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def architecture(spec: BackboneSpec) -> Any:
    """The spec's ``transformers`` config (no download)."""
    tf = require_transformers()
    return getattr(tf, FAMILIES[spec.family].config_class)(**dict(spec.arch))


def model_id(spec: BackboneSpec) -> str:
    """The Hugging Face repository of the spec's default weights."""
    source = spec.weights_source
    if not isinstance(source, HubWeights):
        raise InputError(f"backbone {spec.name}: a Hugging Face family needs HubWeights, not {source}")
    return source.repo


@contextlib.contextmanager
def _quiet_loading(tf: Any) -> Iterator[None]:
    """``transformers`` warns about the unused text tower when a vision tower loads from a full checkpoint, and
    draws its own progress bars: keep both out of logs and pipes."""
    bars = tf.utils.logging.is_progress_bar_enabled()
    if bars and not interactive():
        tf.utils.logging.disable_progress_bar()
    try:
        with quiet("transformers"):
            yield
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()


def _missing(spec: BackboneSpec, why: str) -> ArtifactError:
    mid = model_id(spec)
    return ArtifactError(
        f"the {spec.name} weights ({mid}) are not in the Hugging Face cache and were not downloaded ({why}); "
        f"with internet, fetch them once (before torchrun): `hf download {mid}`; offline, copy a folder made by "
        f"`hf download {mid} --local-dir DIR` (config.json and model.safetensors) and pass --backbone.weights DIR"
    )


def _pretrained(spec: BackboneSpec, where: Path | HubWeights) -> nn.Module:
    """Load the weights from the cache or a local folder (:func:`~geoswc.models.registry.resolve_weights`);
    safetensors only."""
    tf = require_transformers()
    cls = getattr(tf, FAMILIES[spec.family].model_class)
    if isinstance(where, Path):
        if not (where / "config.json").is_file():
            raise InputError(
                f"--backbone.weights {where}: {spec.name} takes a folder holding a saved Hugging Face "
                "model (config.json and model.safetensors)"
            )
        source, local = str(where), True
    else:  # torchrun ranks never download: all at once they would race on the cache
        source, local = where.repo, offline() or distributed.world_size() > 1
    log.info("loading %s weights from %s", spec.name, source)
    try:
        with _quiet_loading(tf):
            return cls.from_pretrained(source, local_files_only=local, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - the hub and transformers raise many kinds
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if isinstance(where, Path):
            raise ArtifactError(f"cannot load {spec.name} weights from {where}: {why}") from e
        raise _missing(spec, why) from e


def _check_architecture(spec: BackboneSpec, net: nn.Module, where: str) -> None:
    """Pretrained weights must have the registry's architecture (fine-tuned models are rebuilt from it)."""
    got = net.config.to_dict()
    diff = {k: (got.get(k), v) for k, v in spec.arch if got.get(k) != v}
    if diff:
        raise ArtifactError(
            f"the weights in {where} are not a {spec.name} (config differs: "
            + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(diff.items()))
            + ")"
        )


def create_hf_backbone(
    spec: BackboneSpec, cfg: BackboneConfig, load_weights: bool = True
) -> tuple[HFBackbone, BackboneConfig]:
    """:func:`geoswc.models.backbone.create_backbone` of a Hugging Face entry. The weights digest is that of the
    loaded tensors (:func:`geoswc.core.tensor_files.state_digest`), wherever they came from."""
    resolved = dataclasses.replace(cfg, feature_dim=spec.feature_dim)
    where = resolve_weights(spec, cfg.weights) if load_weights else None
    if where is not None:
        net = _pretrained(spec, where)
        label = str(where) if isinstance(where, Path) else where.repo
        _check_architecture(spec, net, label)
        sha = state_digest(net.state_dict())
        check_weights_digest(cfg, sha, f"from {label}")
        resolved = dataclasses.replace(resolved, weights_sha256=sha)
    else:
        net = getattr(require_transformers(), FAMILIES[spec.family].model_class)(architecture(spec))
    size = dict(spec.arch).get("image_size", spec.image_size)
    backbone = HFBackbone(net, spec.family, spec.feature_dim, cfg.preprocess.image_size != size)
    return backbone.eval(), resolved


for _name, _family in FAMILIES.items():
    register_family(_name, Builder(create_hf_backbone, _family.pooled_doc), [s for s in SPECS if s.family == _name])
