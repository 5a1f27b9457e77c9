"""The trained model: backbone + MvMF head + RRM, saved as a folder with its config and cell table.

On disk: ``config.json`` (format, resolved :class:`ModelConfig`, sha256 of each weights file, and the
model fingerprint), ``cells.csv``, ``heads.safetensors`` and, when the backbone was fine-tuned,
``backbone.safetensors`` (otherwise the backbone's registry weights are used, checked by digest).

A model's fingerprint digests its config and weights. It is computed from the current weights whenever
it is read (cached while they do not change), so it is never stale after training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from geoswc.core import atomic_files, json_records, tensor_files
from geoswc.core.config import ModelConfig, canonical_json, digest, from_dict, to_dict
from geoswc.core.errors import ArtifactError, ModelMismatchError
from geoswc.core.tensor_files import state_digest
from geoswc.gallery.files import temporary_gallery
from geoswc.gallery.search import Gallery, GalleryIdentity
from geoswc.geo.cells import CellTable, check_cells
from geoswc.models.backbone import create_backbone
from geoswc.models.heads import MvMFHead, ResidualRetrievalModule, kappa_from_spread
from geoswc.models.registry import TrunkBackbone

MODEL_FORMAT = "geoswc-model/1"
_META_KEYS = ("fingerprint", "backbone_fingerprint", "files_sha256", "cells_sha256", "config")


class GeoModel(nn.Module):
    """Image -> (cell logits, retrieval embedding).

    Args:
        config: resolved config (``backbone.feature_dim`` set).
        cells: the classifier's cells (the table the config names, when it names one).
        backbone: the feature extractor; None for a heads-only model working on cached features.
        config_json: the config as its file recorded it (a model saved before a config field existed lacks
            it); the fingerprint digests this form. Default: ``config`` itself.
    """

    def __init__(
        self,
        config: ModelConfig,
        cells: CellTable,
        backbone: TrunkBackbone | None = None,
        config_json: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_cells(config, cells)
        resolved = dataclasses.replace(config, cells_fingerprint=cells.fingerprint, num_cells=len(cells))
        self.cells = dataclasses.replace(cells, config=config.cells) if config.cells is not None else cells
        self.backbone = backbone
        dim = config.backbone.feature_dim
        count = torch.as_tensor(cells.count, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):  # the heads' initial weights depend on the seed only
            torch.manual_seed(config.train.seed)
            self.mvmf = MvMFHead(
                dim,
                torch.tensor(cells.xyz, dtype=torch.float32),
                kappa_from_spread(torch.as_tensor(cells.spread_km, dtype=torch.float32)),
                log_prior=torch.log(count / count.sum()).float(),
                hidden=config.heads.mvmf_hidden,
                dropout=config.heads.mvmf_dropout,
            )
            self.rrm = ResidualRetrievalModule(dim, config.heads.rrm_hidden)
        self._set_config(resolved, config_json if config_json is not None and resolved == config else None)

    def _set_config(self, config: ModelConfig, config_json: dict[str, Any] | None) -> None:
        self._config = config
        self._config_json = config_json if config_json is not None else to_dict(config)
        self._digests: dict[str, tuple[tuple, str]] = {}
        self._stored_backbone_fp = ""  # a fine-tuned model loaded without its backbone: the checked file's record

    @property
    def config(self) -> ModelConfig:
        """The resolved config (frozen; :meth:`update_config` replaces it)."""
        return self._config

    def update_config(self, **changes: Any) -> None:
        """Replace the config by a copy with ``changes`` (e.g. ``backbone_finetuned=True`` after fine-tuning)."""
        self._set_config(dataclasses.replace(self._config, **changes), None)

    @classmethod
    def create(cls, config: ModelConfig, cells: CellTable, with_backbone: bool = True) -> GeoModel:
        """A fresh model: registry backbone weights, initialised heads."""
        if not with_backbone:
            return cls(config, cells)
        backbone, resolved = create_backbone(config.backbone)
        return cls(dataclasses.replace(config, backbone=resolved), cells, backbone)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features (B, D)`` -> ``(logits (B, C), embeddings (B, D))``."""
        return self.mvmf(features), self.rrm(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, 3, S, S)`` -> ``(logits (B, C), embeddings (B, D))``."""
        if self.backbone is None:
            raise RuntimeError("this model was built without a backbone; call heads() on features")
        return self.heads(self.backbone(images))

    @torch.inference_mode()
    def embed(self, features: torch.Tensor) -> np.ndarray:
        """Retrieval embeddings ``(B, D)`` (unit rows) of backbone features ``(B, D)``: the one path by which
        gallery entries are embedded (the RRM has no dropout or batch statistics: train and eval agree)."""
        return self.rrm(features.float()).cpu().numpy()

    def gallery(
        self, features: torch.Tensor, lat: ArrayLike, lon: ArrayLike, names: Sequence[str], authors: Sequence[str]
    ) -> Gallery:
        """A gallery of photos ``(N,)`` from their backbone features ``(N, D)``, flat (exact), written by the
        index writer into a temporary folder (:func:`geoswc.gallery.files.temporary_gallery`)."""
        lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        cell = self.cells.assign(lat, lon)
        chunks = (
            (
                self.embed(features[s : s + 4096]),
                lat[s : s + 4096],
                lon[s : s + 4096],
                cell[s : s + 4096],
                names[s : s + 4096],
                authors[s : s + 4096],
            )
            for s in range(0, len(features), 4096)
        )
        return temporary_gallery(chunks, self.config.backbone.feature_dim, self.gallery_identity)

    @property
    def gallery_identity(self) -> GalleryIdentity:
        """What a gallery this model embeds records about it."""
        return GalleryIdentity(self.fingerprint, self.cells.fingerprint, len(self.cells))

    # -- identity -------------------------------------------------------------------------------------

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The heads' weights as one flat state dict (``mvmf.*``, ``rrm.*``)."""
        return {f"mvmf.{k}": v for k, v in self.mvmf.state_dict().items()} | {
            f"rrm.{k}": v for k, v in self.rrm.state_dict().items()
        }

    def _digest(self, name: str, state: dict[str, torch.Tensor]) -> str:
        """:func:`state_digest`, cached until a tensor is replaced or changed in place."""
        key = tuple((k, id(v), v._version) for k, v in state.items())  # noqa: SLF001 - torch's mutation counter
        hit = self._digests.get(name)
        if hit is None or hit[0] != key:
            hit = self._digests[name] = (key, state_digest(state))
        return hit[1]

    @property
    def backbone_fingerprint(self) -> str:
        """Identity of the feature extractor: its config and weights digest, plus the weights themselves
        once fine-tuned. Equal fingerprints, equal features."""
        fp = digest(canonical_json(self._config_json["backbone"]))
        if not self._config.backbone_finetuned:
            return fp
        if self.backbone is not None:
            return digest(fp, self._digest("backbone", self.backbone.state_dict()))
        if not self._stored_backbone_fp:
            raise ArtifactError("a fine-tuned model without its backbone has no backbone fingerprint")
        return self._stored_backbone_fp

    @property
    def fingerprint(self) -> str:
        """Digest of config and weights; every index and evaluation output records it."""
        return digest(
            canonical_json(self._config_json), self.backbone_fingerprint, self._digest("heads", self.head_tensors())
        )

    # -- files ----------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> str:
        """Write the model folder atomically file by file (config last). Returns the fingerprint."""
        folder = atomic_files.ensure_dir(folder)
        atomic_files.write_text(folder / "cells.csv", self.cells.to_csv())
        files = {"heads.safetensors": tensor_files.save_tensors(folder / "heads.safetensors", self.head_tensors())}
        if self.config.backbone_finetuned:
            if self.backbone is None:
                raise ArtifactError("a fine-tuned model must be saved with its backbone")
            stored = _half_safe(self.backbone.state_dict())
            # Keep the in-memory model equal to what a load will give back.
            self.backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in stored.items()})
            files["backbone.safetensors"] = tensor_files.save_tensors(folder / "backbone.safetensors", stored)
        fp = self.fingerprint
        atomic_files.write_json(
            folder / "config.json",
            {
                "format": MODEL_FORMAT,
                "fingerprint": fp,
                "backbone_fingerprint": self.backbone_fingerprint,
                "files_sha256": files,
                "cells_sha256": tensor_files.sha256_file(folder / "cells.csv"),
                "config": self._config_json,
            },
        )
        return fp

    @staticmethod
    def read_config(folder: str | Path) -> ModelConfig:
        """A model folder's config, read and checked field by field (its weights are not loaded or checked)."""
        folder = Path(folder)
        return _read_config(
            folder,
            json_records.read_record(
                folder / "config.json",
                "model",
                MODEL_FORMAT,
                _META_KEYS,
                "rebuild it with `geoswc train`, or restore its config.json",
            ),
        )

    @classmethod
    def load(cls, folder: str | Path, with_backbone: bool = True, device: str | torch.device = "cpu") -> GeoModel:
        """Load a model folder, checking every file's digest and the fingerprint.

        Raises:
            ArtifactError: missing, truncated or tampered files, or an unknown format.
        """
        folder = Path(folder)
        meta = json_records.read_record(
            folder / "config.json",
            "model",
            MODEL_FORMAT,
            _META_KEYS,
            "rebuild it with `geoswc train`, or restore its config.json",
        )
        config = _read_config(folder, meta)
        cells = _read_cells(folder, meta, config)
        try:  # a config.json whose values do not fit together is a damaged model, not a bug
            backbone = _load_backbone(folder, config, meta["files_sha256"]) if with_backbone else None
            model = cls(config, cells, backbone, config_json=meta["config"])
        except ArtifactError as e:
            if not isinstance(e, ModelMismatchError):
                raise
            raise ArtifactError(f"model {folder} is damaged or mixed: {e}; restore or rebuild it") from e
        except (ValueError, TypeError, RuntimeError, OverflowError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise ArtifactError(f"model {folder} is damaged or mixed: {why}; restore or rebuild it") from e
        if config.backbone_finetuned and backbone is None:  # its weights file is checked, not loaded
            path = folder / "backbone.safetensors"
            if not path.is_file() or tensor_files.sha256_file(path) != meta["files_sha256"]["backbone.safetensors"]:
                raise ArtifactError(f"{path} is missing, damaged or was changed; restore the model folder")
            model._stored_backbone_fp = str(meta["backbone_fingerprint"])
        heads = tensor_files.load_tensors(
            folder / "heads.safetensors", "model heads", meta["files_sha256"].get("heads.safetensors")
        )
        try:
            model.mvmf.load_state_dict({k[5:]: v for k, v in heads.items() if k.startswith("mvmf.")})
            model.rrm.load_state_dict({k[4:]: v for k, v in heads.items() if k.startswith("rrm.")})
        except RuntimeError as e:
            raise ArtifactError(f"model heads in {folder} do not fit its config: {e}") from e
        for field, computed in (
            ("backbone_fingerprint", model.backbone_fingerprint),
            ("fingerprint", model.fingerprint),
        ):
            if computed != meta[field]:
                raise ArtifactError(
                    f"model {folder} does not match its recorded {field.replace('_', ' ')} "
                    f"({str(meta[field])[:40]} vs {computed}): the config or weights were changed; "
                    "rebuild or restore it"
                )
        return model.to(device).eval()


def _read_config(folder: Path, meta: dict[str, Any]) -> ModelConfig:
    try:
        config = from_dict(ModelConfig, meta["config"])
    except ArtifactError as e:
        raise ArtifactError(
            f"model config {folder / 'config.json'} is damaged or of another version ({e}); "
            "restore the model folder or rebuild it"
        ) from e
    files = meta["files_sha256"]
    needed = ("heads.safetensors", "backbone.safetensors") if config.backbone_finetuned else ("heads.safetensors",)
    json_records.require_keys(
        files if isinstance(files, dict) else {}, needed, "model config (files_sha256)", folder / "config.json"
    )
    return config


def _read_cells(folder: Path, meta: dict[str, Any], config: ModelConfig) -> CellTable:
    path = folder / "cells.csv"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; restore the model folder")
    if tensor_files.sha256_file(path) != meta["cells_sha256"]:
        raise ArtifactError(f"{path} is damaged or was changed; restore the model folder")
    cells = CellTable.load(path)
    if config.num_cells != len(cells):
        raise ArtifactError(
            f"{folder / 'config.json'} records {config.num_cells} cells, {path} holds {len(cells)}: "
            "the folder is damaged or mixed; restore or rebuild the model"
        )
    return cells


def _load_backbone(folder: Path, config: ModelConfig, files: dict[str, str]) -> TrunkBackbone:
    if not config.backbone_finetuned:
        return create_backbone(config.backbone)[0]
    backbone, _ = create_backbone(config.backbone, load_weights=False)
    sd = tensor_files.load_tensors(
        folder / "backbone.safetensors", "fine-tuned backbone weights", files.get("backbone.safetensors")
    )
    backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return backbone


def _half_safe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fine-tuned backbone weights are stored as float16 (half the size); BN statistics stay float32."""
    out = {}
    for k, v in state.items():
        keep32 = not v.is_floating_point() or "running_" in k or np.prod(v.shape) < 1024
        out[k] = v if keep32 else v.half()
    return out
