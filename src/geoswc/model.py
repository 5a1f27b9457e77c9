"""The trained model: backbone + MvMF head + RRM, saved as a folder with its config and cell table.

On disk: ``config.json`` (format, resolved :class:`ModelConfig`, sha256 of each weights file, and the
model fingerprint), ``cells.csv``, ``heads.safetensors`` and, when the backbone was fine-tuned,
``backbone.safetensors`` (otherwise the backbone's registry weights are used, checked by digest).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import storage
from .backbone import Backbone, backbone_fingerprint, create_backbone
from .cells import CellTable
from .config import ModelConfig, canonical_json, digest, from_dict, to_dict
from .errors import ArtifactError, ModelMismatchError
from .heads import MvMFHead, ResidualRetrievalModule, kappa_from_spread

log = logging.getLogger(__name__)

MODEL_FORMAT = "geoswc-model/1"


class GeoModel(nn.Module):
    """Image -> (cell logits, retrieval embedding).

    Args:
        config: resolved config (``backbone.feature_dim`` set).
        cells: the classifier's cells.
        backbone: the feature extractor; None for a heads-only model working on cached features.
    """

    def __init__(self, config: ModelConfig, cells: CellTable, backbone: Backbone | None = None) -> None:
        super().__init__()
        if config.cells_fingerprint and config.cells_fingerprint != cells.fingerprint:
            raise ModelMismatchError(
                f"cell table {cells.fingerprint} is not the one the model config names "
                f"({config.cells_fingerprint})"
            )
        config.cells_fingerprint = cells.fingerprint
        config.num_cells = len(cells)
        self.config = config
        self.cells = cells
        self.backbone = backbone
        dim = config.backbone.feature_dim
        count = torch.as_tensor(cells.count, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):  # the heads' initial weights depend on the seed only
            torch.manual_seed(config.train.seed)
            self.mvmf = MvMFHead(
                dim,
                torch.as_tensor(cells.xyz, dtype=torch.float32),
                kappa_from_spread(torch.as_tensor(cells.spread_km, dtype=torch.float32)),
                log_prior=torch.log(count / count.sum()).float(),
                hidden=config.heads.mvmf_hidden,
                dropout=config.heads.mvmf_dropout,
            )
            self.rrm = ResidualRetrievalModule(dim, config.heads.rrm_hidden)

    @classmethod
    def create(cls, config: ModelConfig, cells: CellTable, with_backbone: bool = True) -> GeoModel:
        """A fresh model: registry backbone weights, initialised heads."""
        backbone = None
        if with_backbone:
            backbone, config.backbone = create_backbone(config.backbone)
        return cls(config, cells, backbone)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features (B, D)`` -> ``(logits (B, C), embeddings (B, D))``."""
        return self.mvmf(features), self.rrm(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, 3, S, S)`` -> ``(logits (B, C), embeddings (B, D))``."""
        if self.backbone is None:
            raise RuntimeError("this model was built without a backbone; call heads() on features")
        return self.heads(self.backbone(images))

    @property
    def backbone_fingerprint(self) -> str:
        """Identity of the feature extractor (fine-tuned weights included)."""
        return self._backbone_fp

    _backbone_fp: str = ""
    fingerprint: str = ""
    """Digest of config + weights; every index and evaluation output records it."""

    def _head_tensors(self) -> dict[str, torch.Tensor]:
        return {f"mvmf.{k}": v for k, v in self.mvmf.state_dict().items()} | {
            f"rrm.{k}": v for k, v in self.rrm.state_dict().items()}

    _stored_config: tuple[dict[str, Any], dict[str, Any]] | None = None
    """``(config as loaded, config as stored in the file)``: set by :meth:`load`."""

    def compute_fingerprints(self) -> None:
        """Refresh :attr:`fingerprint` and :attr:`backbone_fingerprint` from the current weights.

        The config part of the digest is the config as it was written. A model saved by an older version
        lacks fields added since, which load at their defaults; digesting the stored JSON keeps its
        fingerprint (and the indexes that record it) valid after an upgrade, as long as the config is
        not changed after loading.
        """
        config = to_dict(self.config)
        if self._stored_config is not None and self._stored_config[0] == config:
            config = self._stored_config[1]
            bb = digest(canonical_json(config["backbone"]))  # what backbone_fingerprint gave when it was saved
        else:
            bb = backbone_fingerprint(self.config.backbone)
        if self.config.backbone_finetuned and self.backbone is not None:
            bb = digest(bb, _state_digest(self.backbone.state_dict()))
        self._backbone_fp = bb
        self.fingerprint = digest(canonical_json(config), bb, _state_digest(self._head_tensors()))

    def save(self, folder: str | Path) -> str:
        """Write the model folder atomically file by file (config last). Returns the fingerprint."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        storage.write_text(folder / "cells.csv", self.cells.to_csv())
        files = {"heads.safetensors": storage.save_tensors(folder / "heads.safetensors", self._head_tensors())}
        if self.config.backbone_finetuned:
            if self.backbone is None:
                raise RuntimeError("a fine-tuned model must be saved with its backbone")
            stored = _half_safe(self.backbone.state_dict())
            # Keep the in-memory model equal to what a load will give back.
            self.backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in stored.items()})
            files["backbone.safetensors"] = storage.save_tensors(folder / "backbone.safetensors", stored)
        self.compute_fingerprints()
        storage.write_json(folder / "config.json", {
            "format": MODEL_FORMAT,
            "fingerprint": self.fingerprint,
            "backbone_fingerprint": self.backbone_fingerprint,
            "files_sha256": files,
            "cells_sha256": storage.sha256_file(folder / "cells.csv"),
            "config": to_dict(self.config),
        })
        return self.fingerprint

    @classmethod
    def load(cls, folder: str | Path, with_backbone: bool = True, device: str | torch.device = "cpu") -> GeoModel:
        """Load a model folder, checking every file's digest and the fingerprint.

        Raises:
            ArtifactError: missing, truncated or tampered files, or an unknown format.
        """
        folder = Path(folder)
        meta = storage.read_json(folder / "config.json", "model config")
        if meta.get("format") != MODEL_FORMAT:
            raise ArtifactError(f"{folder} is not a geoswc model (format {meta.get('format')!r}); rebuild it with "
                                "`geoswc train`, or restore its config.json")
        storage.require_keys(meta, ("fingerprint", "backbone_fingerprint", "files_sha256", "cells_sha256", "config"),
                             "model config", folder / "config.json")
        try:
            config = from_dict(ModelConfig, meta["config"])
        except ArtifactError as e:
            raise ArtifactError(f"model config {folder / 'config.json'} is damaged or of another version ({e}); "
                                "restore the model folder or rebuild it") from e
        files = meta["files_sha256"]
        needed = ("heads.safetensors", "backbone.safetensors") if config.backbone_finetuned else ("heads.safetensors",)
        storage.require_keys(files if isinstance(files, dict) else {}, needed, "model config (files_sha256)",
                             folder / "config.json")
        if not (folder / "cells.csv").is_file():
            raise ArtifactError(f"{folder / 'cells.csv'} is missing; restore the model folder")
        if storage.sha256_file(folder / "cells.csv") != meta.get("cells_sha256"):
            raise ArtifactError(f"{folder / 'cells.csv'} is damaged or was changed; restore the model folder")
        cells = CellTable.load(folder / "cells.csv")
        if config.num_cells != len(cells):
            raise ArtifactError(f"{folder / 'config.json'} records {config.num_cells} cells, {folder / 'cells.csv'} "
                                f"holds {len(cells)}: the folder is damaged or mixed; restore or rebuild the model")
        cells.config = config.cells
        backbone = None
        if with_backbone:
            if config.backbone_finetuned:
                backbone, _ = create_backbone(config.backbone, load_weights=False)
                sd = storage.load_tensors(folder / "backbone.safetensors", "fine-tuned backbone weights",
                                          files.get("backbone.safetensors"))
                backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
            else:
                backbone, _ = create_backbone(config.backbone)
        try:
            model = cls(config, cells, backbone)
        except ModelMismatchError as e:
            raise ArtifactError(f"model {folder} is damaged or mixed: {e}; restore or rebuild it") from e
        heads = storage.load_tensors(folder / "heads.safetensors", "model heads", files.get("heads.safetensors"))
        try:
            model.mvmf.load_state_dict({k[5:]: v for k, v in heads.items() if k.startswith("mvmf.")})
            model.rrm.load_state_dict({k[4:]: v for k, v in heads.items() if k.startswith("rrm.")})
        except RuntimeError as e:
            raise ArtifactError(f"model heads in {folder} do not fit its config: {e}") from e
        model._stored_config = (to_dict(config), meta["config"])
        model.compute_fingerprints()
        if model.fingerprint != meta.get("fingerprint") or model.backbone_fingerprint != meta["backbone_fingerprint"]:
            raise ArtifactError(
                f"model {folder} does not match its recorded fingerprint ({meta.get('fingerprint')} vs "
                f"{model.fingerprint}): the config or weights were changed; rebuild or restore it"
            )
        return model.to(device).eval()


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    parts: list[bytes] = []
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        parts += [k.encode(), str(tuple(v.shape)).encode(), str(v.dtype).encode(),
                  v.reshape(-1).view(torch.uint8).numpy().tobytes()]
    return digest(*parts)


def _half_safe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fine-tuned backbone weights are stored as float16 (half the size); BN statistics stay float32."""
    out = {}
    for k, v in state.items():
        keep32 = not v.is_floating_point() or "running_" in k or np.prod(v.shape) < 1024
        out[k] = v if keep32 else v.half()
    return out
