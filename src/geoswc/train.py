"""Training: the MvMF head (negative log-likelihood of the true positions) and the RRM (geodesic
InfoNCE) on cached features, optionally followed by end-to-end fine-tuning of the backbone on images.

Every epoch's randomness is derived from ``(seed, phase, epoch)``, and a checkpoint (weights, optimizer
state, progress) is written atomically after each epoch, so a killed run re-run with the same command
resumes where it stopped and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import BallTree
from torch import nn
from tqdm.auto import tqdm

from . import storage
from .config import TrainConfig, canonical_json, digest, to_dict
from .data import ImageDataset, Record
from .errors import ArtifactError, InputError
from .features import FeatureSet
from .geo import EARTH_RADIUS_KM, latlon_to_xyz
from .heads import geo_contrastive_loss
from .model import GeoModel

log = logging.getLogger(__name__)


def _epoch_seed(seed: int, phase: str, epoch: int) -> int:
    return int(digest(f"{seed}/{phase}/{epoch}", length=8), 16)


def _cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _author_ids(authors: Sequence[str]) -> np.ndarray:
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(a, len(ids)) if a else -1 for a in authors], np.int64)


def positive_lists(lat: np.ndarray, lon: np.ndarray, authors: np.ndarray, positive_km: float,
                   same_author_positives: bool) -> list[np.ndarray]:
    """For each photo, the other photos that count as its positives (within ``positive_km``)."""
    tree = BallTree(np.radians(np.stack([lat, lon], 1)), metric="haversine")
    near = tree.query_radius(np.radians(np.stack([lat, lon], 1)), r=positive_km / EARTH_RADIUS_KM)
    out = []
    for i, js in enumerate(near):
        js = js[js != i]
        if not same_author_positives and authors[i] >= 0:
            js = js[authors[js] != authors[i]]
        out.append(np.sort(js))
    return out


@dataclass
class Checkpointer:
    """Atomic per-epoch checkpoints of a training run in ``folder`` (None disables them)."""

    folder: Path | None
    run_key: str
    state: dict[str, Any] = field(default_factory=dict)

    def resume(self, modules: dict[str, nn.Module]) -> dict[str, Any]:
        """Load the last checkpoint into ``modules``; returns its progress record (empty if none)."""
        if self.folder is None or not (self.folder / "checkpoint.json").is_file():
            return {}
        meta = storage.read_json(self.folder / "checkpoint.json", "training checkpoint")
        if meta.get("run_key") != self.run_key:
            raise ArtifactError(
                f"the checkpoint in {self.folder} belongs to a run with other data or settings; "
                "use another --out folder, or delete that checkpoint to start over"
            )
        t = storage.load_tensors(self.folder / "checkpoint.safetensors", "training checkpoint",
                                 meta.get("tensors_sha256"))
        for name, mod in modules.items():
            prefix = f"{name}."
            mod.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
        self.state = meta
        self.state["optimizer_tensors"] = {k[4:]: v for k, v in t.items() if k.startswith("opt.")}
        log.info("resuming from checkpoint: phase %s, epoch %s", meta.get("phase"), meta.get("epoch"))
        return meta

    def save(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
             progress: dict[str, Any]) -> None:
        if self.folder is None:
            return
        tensors = {f"{n}.{k}": v.detach().cpu() for n, m in modules.items() for k, v in m.state_dict().items()}
        opt_meta: dict[str, Any] = {}
        if optimizer is not None:
            sd = optimizer.state_dict()
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu()
            opt_meta = {"param_groups": sd["param_groups"]}
        sha = storage.save_tensors(self.folder / "checkpoint.safetensors", tensors)
        storage.write_json(self.folder / "checkpoint.json",
                           {"run_key": self.run_key, "tensors_sha256": sha, "optimizer": opt_meta, **progress})

    def restore_optimizer(self, optimizer: torch.optim.Optimizer, phase: str) -> None:
        if self.state.get("phase") != phase or not self.state.get("optimizer"):
            return
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in self.state.get("optimizer_tensors", {}).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": self.state["optimizer"]["param_groups"]})


PHASES = ("mvmf", "rrm", "finetune")


def _run_phase(
    phase: str, epochs: int, steps_per_epoch: int, make_batches: Callable[[np.random.Generator], list],
    step: Callable[[Any], torch.Tensor], optimizer: torch.optim.Optimizer, base_lrs: list[float],
    ckpt: Checkpointer, modules: dict[str, nn.Module], seed: int, history: dict[str, list[float]],
    progress: bool, train_modules: Sequence[nn.Module],
) -> None:
    done = ckpt.state.get("phase_epochs", {}).get(phase, 0)
    if done >= epochs:
        return
    if done:
        ckpt.restore_optimizer(optimizer, phase)
    total = epochs * steps_per_epoch
    warmup = min(total // 10, 100)
    for epoch in range(done, epochs):
        es = _epoch_seed(seed, phase, epoch)
        torch.manual_seed(es)
        rng = np.random.default_rng(es)
        for m in train_modules:
            m.train()
        losses = []
        batches = make_batches(rng)
        bar = tqdm(batches, desc=f"{phase} {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False)
        for b_i, batch in enumerate(bar):
            for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = _cosine_lr(base, epoch * steps_per_epoch + b_i, total, warmup)
            loss = step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        mean = float(np.mean(losses)) if losses else float("nan")
        history.setdefault(phase, []).append(mean)
        log.info("%s epoch %d/%d: loss %.4f", phase, epoch + 1, epochs, mean)
        phase_epochs = dict(ckpt.state.get("phase_epochs", {}), **{phase: epoch + 1})
        ckpt.state["phase_epochs"] = phase_epochs
        ckpt.save(modules, optimizer, {"phase": phase, "epoch": epoch + 1, "phase_epochs": phase_epochs,
                                       "history": history})
    for m in train_modules:
        m.eval()


def _pair_batches(n: int, batch_pairs: int, pos: list[np.ndarray], views: int,
                  rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Anchor/partner batches: the partner is a geographic positive when one exists, else another view
    of the anchor (or a random photo when there is only one view)."""
    order = rng.permutation(n)
    batches = []
    for s in range(0, n, batch_pairs):
        anchors = order[s:s + batch_pairs]
        if len(anchors) < 2:
            continue
        partners = np.empty_like(anchors)
        for j, a in enumerate(anchors):
            if len(pos[a]) and (views == 1 or rng.random() < 0.75):
                partners[j] = pos[a][rng.integers(len(pos[a]))]
            elif views > 1:
                partners[j] = a
            else:
                partners[j] = rng.integers(n)
        idx = np.concatenate([anchors, partners])
        v_a = rng.integers(views, size=len(anchors))
        v_p = rng.integers(views, size=len(anchors))
        if views > 1:  # two views of one photo must differ
            same = partners == anchors
            v_p[same] = (v_a[same] + 1 + rng.integers(views - 1, size=int(same.sum()))) % views
        batches.append((idx, np.concatenate([v_a, v_p]), anchors, partners))
    return batches


def train_heads(model: GeoModel, feats: FeatureSet, cfg: TrainConfig, checkpoint_dir: str | Path | None = None,
                progress: bool = True) -> dict[str, list[float]]:
    """Train the MvMF head and the RRM of ``model`` on cached features (the backbone is not touched).

    Args:
        model: its heads are trained in place.
        feats: features ``(N, V, D)`` with positions; must come from the model's backbone.
        cfg: epochs, batch size, learning rate, contrastive settings, seed.
        checkpoint_dir: where per-epoch checkpoints go (resumed from when present).

    Returns:
        Mean loss per epoch of each phase.
    """
    if len(feats) < 2:
        raise InputError(f"training needs at least 2 photos, got {len(feats)}")
    if feats.features.shape[2] != model.config.backbone.feature_dim:
        raise InputError(f"features are {feats.features.shape[2]}-d, the model expects "
                         f"{model.config.backbone.feature_dim}-d")
    X = feats.features
    n, views = X.shape[0], X.shape[1]
    xyz = torch.from_numpy(latlon_to_xyz(feats.lat, feats.lon)).float()
    authors = _author_ids(feats.authors)
    run_key = digest(canonical_json({"train": to_dict(cfg), "model": to_dict(model.config.heads),
                                     "cells": model.config.cells_fingerprint,
                                     "data": feats.backbone_fingerprint, "names": digest(*feats.names)}))
    ckpt = Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None, run_key)
    modules = {"mvmf": model.mvmf, "rrm": model.rrm}
    ckpt.resume(modules)
    history: dict[str, list[float]] = ckpt.state.get("history", {})
    bs = min(cfg.batch_size, n)

    # Phase 1: MvMF, NLL of the true coordinates.
    mv = model.mvmf
    other = [p for name, p in mv.named_parameters() if name != "log_kappa"]
    opt = torch.optim.AdamW([{"params": other, "weight_decay": cfg.weight_decay},
                             {"params": [mv.log_kappa], "weight_decay": 0.0}], lr=cfg.lr)
    lrs = [cfg.lr, cfg.lr * 10]

    def mvmf_batches(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        order = rng.permutation(n)
        return [(order[s:s + bs], rng.integers(views, size=len(order[s:s + bs]))) for s in range(0, n, bs)]

    def mvmf_step(batch: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        rows, v = batch
        f = X[torch.from_numpy(rows), torch.from_numpy(v)]
        return mv.nll(mv(f), xyz[torch.from_numpy(rows)])

    _run_phase("mvmf", cfg.epochs, math.ceil(n / bs), mvmf_batches, mvmf_step, opt, lrs, ckpt, modules,
               cfg.seed, history, progress, [mv])

    # Phase 2: RRM, geodesic InfoNCE on anchor/partner pairs.
    rrm = model.rrm
    pos = positive_lists(feats.lat, feats.lon, authors, cfg.positive_km, cfg.same_author_positives)
    log.info("RRM: %d of %d photos have a geographic positive within %g km",
             sum(len(p) > 0 for p in pos), n, cfg.positive_km)
    opt = torch.optim.AdamW(rrm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    authors_t = torch.from_numpy(authors)
    pairs = max(2, bs // 2)

    def rrm_step(batch: tuple[np.ndarray, ...]) -> torch.Tensor:
        idx, v, _, _ = batch
        it = torch.from_numpy(idx)
        emb = rrm(X[it, torch.from_numpy(v)])
        return geo_contrastive_loss(emb, xyz[it], it, authors_t[it], cfg.positive_km, cfg.temperature,
                                    cfg.same_author_positives)

    _run_phase("rrm", cfg.rrm_epochs, math.ceil(n / pairs),
               lambda rng: _pair_batches(n, pairs, pos, views, rng), rrm_step, opt, [cfg.lr], ckpt, modules,
               cfg.seed, history, progress, [rrm])
    model.eval()
    return history


def finetune(model: GeoModel, records: Sequence[Record], cfg: TrainConfig, checkpoint_dir: str | Path | None = None,
             progress: bool = True, num_workers: int = 0, device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """End-to-end fine-tuning of backbone + heads on augmented images (MvMF NLL + geodesic InfoNCE).

    Slow on a CPU (minutes per epoch for a few thousand photos); meant for GPUs. Photos that fail to
    decode are skipped batch by batch.
    """
    if model.backbone is None:
        raise InputError("fine-tuning needs a model with a backbone")
    if len(records) < 2:
        raise InputError(f"fine-tuning needs at least 2 photos, got {len(records)}")
    n = len(records)
    lat = np.array([r.lat for r in records])
    lon = np.array([r.lon for r in records])
    xyz = torch.from_numpy(latlon_to_xyz(lat, lon)).float()
    authors = _author_ids([r.author for r in records])
    pos = positive_lists(lat, lon, authors, cfg.positive_km, cfg.same_author_positives)
    ds = ImageDataset([r.path for r in records], model.config.backbone.preprocess, seed=cfg.seed,
                      train_augment=True)
    run_key = digest(canonical_json({"finetune": to_dict(cfg), "heads": to_dict(model.config.heads),
                                     "cells": model.config.cells_fingerprint, "names": digest(*[r.image for r in records])}))
    ckpt = Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None, run_key)
    modules = {"backbone": model.backbone, "mvmf": model.mvmf, "rrm": model.rrm}
    ckpt.resume(modules)
    history: dict[str, list[float]] = ckpt.state.get("history", {})
    model.to(device)
    opt = torch.optim.AdamW([
        {"params": model.backbone.parameters(), "weight_decay": cfg.weight_decay},
        {"params": list(model.mvmf.parameters()) + list(model.rrm.parameters()), "weight_decay": cfg.weight_decay},
    ], lr=cfg.finetune_lr)
    lrs = [cfg.finetune_lr, cfg.finetune_lr * 10]
    pairs = max(2, min(cfg.batch_size, n) // 2)
    authors_t = torch.from_numpy(authors)

    def step(batch: tuple[np.ndarray, ...]) -> torch.Tensor:
        idx = batch[0]
        items = [ds[int(i)] for i in idx]
        ok = [(int(i), t) for i, t, _ in items if t is not None]
        if len(ok) < 2:
            return sum(p.sum() * 0.0 for p in model.mvmf.parameters())
        it = torch.tensor([i for i, _ in ok])
        x = torch.stack([t for _, t in ok]).to(device)
        logits, emb = model(x)
        nll = model.mvmf.nll(logits, xyz[it].to(device))
        con = geo_contrastive_loss(emb, xyz[it].to(device), it.to(device), authors_t[it].to(device),
                                   cfg.positive_km, cfg.temperature, cfg.same_author_positives)
        return nll + con

    def batches(rng: np.random.Generator) -> list:
        ds.epoch = int(rng.integers(1 << 30))
        return _pair_batches(n, pairs, pos, 1, rng)

    _run_phase("finetune", cfg.finetune_epochs, math.ceil(n / pairs), batches, step, opt, lrs, ckpt, modules,
               cfg.seed, history, progress, [model])
    model.config.backbone_finetuned = True
    model.eval()
    return history

