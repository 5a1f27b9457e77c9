"""End-to-end fine-tuning of backbone + heads on augmented images (MvMF NLL + geodesic InfoNCE), from a
photo list or streamed from WebDataset shards; data-parallel under torchrun (DDP, SyncBatchNorm on GPUs).

Slow on a CPU (minutes per epoch for a few thousand photos); meant for GPUs. Runs are resumable and
deterministic (see :mod:`geoswc.training.checkpoint`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoswc.core import distributed
from geoswc.core.config import RunConfig, TrainConfig, digest, non_default
from geoswc.core.errors import InputError
from geoswc.core.sphere import latlon_to_xyz
from geoswc.data.records import Batch, loader
from geoswc.data.shards import PhotoShard, ShardDataset, count_samples, sample_positions, shard_sources, source_name
from geoswc.models.geomodel import GeoModel
from geoswc.models.heads import geo_contrastive_loss
from geoswc.models.registry import TrunkBackbone
from geoswc.training.checkpoint import Checkpointer, Phase, run_key, run_phase

log = logging.getLogger(__name__)


class _FinetuneNet(nn.Module):
    """The backbone then the heads: the module the engine sets up (DDP under torchrun; its forward runs under the
    precision's autocast and returns float32)."""

    def __init__(self, model: GeoModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, 3, S, S)`` -> ``(logits (B, C), embeddings (B, D))``."""
        assert self.model.backbone is not None
        return self.model.heads(self.model.backbone(x))


class _Finetuning:
    """A fine-tuning run's network and optimizer (set up by the engine: DDP under torchrun, the precision's
    autocast and fp16 loss scaling) and its checkpointer."""

    def __init__(
        self, model: GeoModel, cfg: TrainConfig, eng: distributed.Engine, key: str, checkpoint_dir: str | Path | None
    ) -> None:
        if model.backbone is None:
            raise InputError("fine-tuning needs a model with a backbone")
        self.model, self.cfg, self.eng = model, cfg, eng
        self.ckpt = Checkpointer(
            Path(checkpoint_dir) if checkpoint_dir else None,
            key,
            {"backbone": model.backbone, "mvmf": model.mvmf, "rrm": model.rrm},
        )
        self.ckpt.resume()
        self.history: dict[str, list[float]] = self.ckpt.state.get("history", {})
        self.dev = eng.device
        if eng.enabled and self.dev.type == "cuda":  # batch statistics over the global batch
            model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
            self.ckpt.modules["backbone"] = model.backbone  # (the same state dict)
        if cfg.finetune_blocks:  # any nn.Module can be fine-tuned whole; a registry backbone also by blocks
            if not isinstance(model.backbone, TrunkBackbone):
                raise InputError("train.finetune_blocks needs a registry backbone (one with blocks)")
            trainable = model.backbone.train_last_blocks(cfg.finetune_blocks)
            log.info(
                "fine-tuning the last %d blocks of the backbone (%d tensors); the rest is frozen",
                cfg.finetune_blocks,
                trainable,
            )
        model.to(self.dev)
        opt = torch.optim.AdamW(
            [
                {
                    "params": [p for p in model.backbone.parameters() if p.requires_grad],
                    "weight_decay": cfg.weight_decay,
                },
                {
                    "params": list(model.mvmf.parameters()) + list(model.rrm.parameters()),
                    "weight_decay": cfg.weight_decay,
                },
            ],
            lr=cfg.finetune_lr,
        )
        self.net, self.opt = eng.setup(_FinetuneNet(model), opt)

    def phase(self, steps: int, batches: Any, loss: Any) -> Phase:
        return Phase(
            "finetune",
            self.cfg.finetune_epochs,
            self.cfg.steps(steps),
            batches,
            loss,
            self.opt,
            [self.cfg.finetune_lr, self.cfg.finetune_lr * 10],
            [self.model],
            self.eng,
        )

    def run(self, phase: Phase, progress: bool) -> dict[str, list[float]]:
        run_phase(phase, self.ckpt, self.cfg.seed, self.history, progress)
        self.model.update_config(backbone_finetuned=True)
        self.model.eval()
        return self.history

    def loss(self, x: torch.Tensor | None, xyz: torch.Tensor, src: torch.Tensor, author: torch.Tensor) -> torch.Tensor:
        """MvMF NLL + geodesic InfoNCE of this rank's images ``x (b, 3, S, S)`` (None: all failed to decode).

        Under torchrun the NLL is scaled so that the mean over ranks is the global batch's mean, and the
        InfoNCE runs on the embeddings gathered from every rank.
        """
        cfg, dev, mvmf = self.cfg, self.dev, self.model.mvmf
        if not self.eng.enabled:
            if x is None or x.shape[0] < 2:
                return sum(p.sum() * 0.0 for p in mvmf.parameters())  # type: ignore[return-value]
            logits, emb = self.net(x.to(dev))
            xyz = xyz.to(dev)
            return mvmf.nll(logits, xyz) + geo_contrastive_loss(
                emb, xyz, src.to(dev), author.to(dev), cfg.positive_km, cfg.temperature, cfg.same_author_positives
            )
        n = int(self.eng.sum(torch.tensor([0 if x is None else x.shape[0]])).item())
        real = x is not None
        if x is None:  # a stand-in image keeps every parameter in DDP's graph; its terms have weight 0
            size = self.model.config.backbone.preprocess.image_size
            x, xyz = torch.zeros(1, 3, size, size), torch.tensor([[0.0, 0.0, 1.0]])
            src, author = torch.tensor([-1]), torch.tensor([-1])
        logits, emb = self.net(x.to(dev))
        xyz = xyz.to(dev)
        log_p = mvmf.log_prob(logits, xyz)
        if n < 2:  # the same decision on every rank
            return (log_p.sum() + emb.sum()) * 0.0
        keep = slice(None) if real else slice(0, 0)
        gather = self.eng.gather_rows
        return -log_p[keep].sum() * (self.eng.world_size / n) + geo_contrastive_loss(
            gather(emb[keep]),
            gather(xyz[keep]),
            gather(src[keep].to(dev)),
            gather(author[keep].to(dev)),
            cfg.positive_km,
            cfg.temperature,
            cfg.same_author_positives,
        )


def _author_hash(author: str) -> int:
    """A stable id for an author name (-1: unknown), for streams where no global author table exists."""
    return int(digest(author, length=15), 16) if author else -1


def finetune(
    model: GeoModel,
    photos: str | Path | Sequence[str | Path | PhotoShard],
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    run: RunConfig = RunConfig(),
    progress: bool = True,
    samples: int | None = None,
    shuffle_buffer: int = 1000,
) -> dict[str, list[float]]:
    """Fine-tune ``model`` (backbone and heads, in place) on photos with positions, streamed from WebDataset shards
    (``photos``: a shard spec, see :func:`~geoswc.data.shards.resolve_shards`) or from a photo list cut into the
    shards ``geoswc shards`` would write of it (:func:`~geoswc.data.shards.photo_shards`): one path, so the same
    photos give the same model whether they were packed or not. Photos that fail to decode are skipped.

    A step's global batch holds ``batch_size // 2`` photos with two augmented views each (the views are
    each other's positives, as are photos of the batch taken within ``positive_km``). Every epoch the
    shards are reshuffled and dealt to the ranks and their ``run.workers`` DataLoader workers; each rank
    streams its own shards (cycling them) and contributes its share of every batch. An epoch is
    ``samples // (batch_size // 2)`` steps; ``samples`` defaults to the count in ``shards.json`` (else
    the shards are counted). Epoch ``e`` depends only on ``(seed, e)``, so a killed run resumes from its
    last per-epoch checkpoint. ``run`` gives the decoding processes, the device and the precision (autocast of
    the backbone on GPUs).

    Returns:
        The mean loss of each epoch (``finetune``).
    """
    urls = shard_sources(photos)
    eng = distributed.engine_for(run.device, run.precision)
    if len(urls) < eng.world_size:
        raise InputError(f"{len(urls)} shards cannot feed {eng.world_size} ranks; write smaller shards")
    total = samples if samples is not None else count_samples(urls)
    photos = max(2, cfg.batch_size // 2)
    lo, hi = distributed.shard_range(photos, eng)
    if hi <= lo:
        raise InputError(f"a batch of {photos} photos cannot be split over {eng.world_size} ranks")
    steps = max(1, total // photos)
    ds = ShardDataset(
        urls,
        model.config.backbone.preprocess,
        views=2,
        seed=cfg.seed,
        train_augment=True,
        shuffle_buffer=shuffle_buffer,
        repeat=True,
    )
    key = run_key(
        finetune=non_default(cfg),
        heads=non_default(model.config.heads),
        cells=model.config.cells_fingerprint,
        samples=total,
        shards=digest(*[source_name(u) for u in urls]),
    )
    ft = _Finetuning(model, cfg, eng, key, checkpoint_dir)
    skipped: list[tuple[str, str]] = []

    def loss(b: Batch) -> torch.Tensor:
        skipped.extend((m.image, str(e)) for _, m, e in b.bad)
        if b.images is None:
            return ft.loss(None, torch.zeros(0, 3), b.keys, b.keys)
        xyz = torch.from_numpy(latlon_to_xyz(*sample_positions(b.metas)))
        author = torch.tensor([_author_hash(m.author) for m in b.metas], dtype=torch.long)
        two = 2 * torch.ones(len(b.metas), dtype=torch.long)  # (b, 2, 3, S, S) -> (2b, 3, S, S), views adjacent
        return ft.loss(
            b.images.flatten(0, 1),
            xyz.float().repeat_interleave(two, 0),
            b.keys.repeat_interleave(two),
            author.repeat_interleave(two),
        )

    def batches(rng: np.random.Generator) -> Any:
        ds.set_epoch(int(rng.integers(1 << 30)))
        return itertools.islice(loader(ds, hi - lo, run.workers), steps)

    history = ft.run(ft.phase(steps, batches, loss), progress)
    if skipped:
        log.warning(
            "fine-tuning skipped %d unreadable samples (rank %d), e.g. %s: %s", len(skipped), eng.rank, *skipped[0]
        )
    return history
