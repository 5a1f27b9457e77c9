"""Training: the MvMF head (negative log-likelihood of the true positions) and the RRM (geodesic
InfoNCE) on cached features, optionally followed by end-to-end fine-tuning of the backbone on images.

Every epoch's randomness is derived from ``(seed, phase, epoch)``, and a checkpoint (weights, optimizer
state, progress) is written atomically after each epoch, so a killed run re-run with the same command
resumes where it stopped and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import itertools
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

from . import distributed, storage
from .config import TrainConfig, canonical_json, digest, non_default
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


def validation_split(authors: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(train, validation)`` with whole photographers on one side: ``fraction`` of the authors
    (a photo without one counts as its own author) are drawn at random (``seed``) for validation.

    Raises:
        InputError: when either side would be empty.
    """
    groups = np.array([f"a:{a}" if a else f"p:{i}" for i, a in enumerate(authors)])
    names = np.unique(groups)
    rng = np.random.default_rng((seed, 0x7A1))
    k = math.ceil(fraction * len(names)) if fraction > 0 else 0
    if k == 0 or k >= len(names):
        raise InputError(f"val_fraction {fraction} of {len(names)} photographers leaves "
                         f"{'no validation' if k == 0 else 'no training'} photos; change it or use 0")
    held = np.isin(groups, rng.choice(names, size=k, replace=False))
    return np.nonzero(~held)[0], np.nonzero(held)[0]


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
        try:
            meta = storage.read_json(self.folder / "checkpoint.json", "training checkpoint")
        except ArtifactError as e:
            raise ArtifactError(f"{e}; or delete {self.folder} to start the training over") from e
        if meta.get("run_key") != self.run_key:
            raise ArtifactError(
                f"the checkpoint in {self.folder} belongs to a run with other data or settings; "
                "use another --out folder, or delete that checkpoint to start over"
            )
        name = str(meta.get("tensors_file", "checkpoint.safetensors"))
        if Path(name).name != name:
            raise ArtifactError(f"the checkpoint in {self.folder} names an odd tensors file {name!r}; delete it")
        try:
            t = storage.load_tensors(self.folder / name, "training checkpoint", meta.get("tensors_sha256"))
        except ArtifactError as e:
            raise ArtifactError(f"{e}; or delete {self.folder} to start the training over") from e
        for name, mod in modules.items():
            prefix = f"{name}."
            mod.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
        self.state = meta
        self.state["optimizer_tensors"] = {k[4:]: v for k, v in t.items() if k.startswith("opt.")}
        log.info("resuming from checkpoint: phase %s, epoch %s", meta.get("phase"), meta.get("epoch"))
        return meta

    def save(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
             progress: dict[str, Any]) -> None:
        if self.folder is None or not distributed.context().is_main:  # under torchrun only rank 0 writes
            return
        tensors = {f"{n}.{k}": v.detach().cpu() for n, m in modules.items() for k, v in m.state_dict().items()}
        opt_meta: dict[str, Any] = {}
        if optimizer is not None:
            sd = optimizer.state_dict()
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu()
            opt_meta = {"param_groups": sd["param_groups"]}
        # A new file name per save: a kill between the two writes leaves checkpoint.json naming the previous
        # tensors, still there and intact, so the re-run resumes from it (one file would mismatch its digest).
        name = f"checkpoint-{progress.get('phase', 'x')}-{progress.get('epoch', 0)}.safetensors"
        sha = storage.save_tensors(self.folder / name, tensors)
        storage.write_json(self.folder / "checkpoint.json", {"run_key": self.run_key, "tensors_file": name,
                                                             "tensors_sha256": sha, "optimizer": opt_meta,
                                                             **progress})
        for old in self.folder.glob("checkpoint*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

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
    progress: bool, train_modules: Sequence[nn.Module], sync_gradients: bool = False,
    scaler: torch.amp.GradScaler | None = None, end_of_epoch: Callable[[], None] | None = None,
) -> None:
    """Train one phase, epoch by epoch from the checkpoint's progress.

    Under torchrun, ``sync_gradients`` averages the gradients of ``train_modules`` over the ranks after
    each backward pass (left False when DDP does it); ``scaler`` scales fp16 losses. ``end_of_epoch``
    runs after each epoch, before its checkpoint is written.
    """
    ctx = distributed.context()
    params = [p for m in train_modules for p in m.parameters()]
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
        bar = tqdm(batches, desc=f"{phase} {epoch + 1}/{epochs}", unit="batch", leave=False,
                   total=len(batches) if hasattr(batches, "__len__") else steps_per_epoch,
                   disable=not progress or not ctx.is_main)
        for b_i, batch in enumerate(bar):
            for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = _cosine_lr(base, epoch * steps_per_epoch + b_i, total, warmup)
            loss = step(batch)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if sync_gradients:
                distributed.average_gradients(params)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        # Each rank's loss is scaled so that their mean is the loss of the global batch.
        mean = distributed.all_reduce_mean(float(np.mean(losses))) if losses else float("nan")
        history.setdefault(phase, []).append(mean)
        log.info("%s epoch %d/%d: loss %.4f", phase, epoch + 1, epochs, mean)
        if end_of_epoch is not None:
            end_of_epoch()
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
                progress: bool = True, device: str | torch.device | None = None) -> dict[str, list[float]]:
    """Train the MvMF head and the RRM of ``model`` on cached features (the backbone is not touched).

    Under torchrun every rank builds the same global batches; each computes the loss terms of its slice
    (the MvMF dropout masks are drawn for the whole batch, and the RRM's InfoNCE runs on the gathered
    embeddings of the whole batch) and the gradients are averaged, so N processes train the model one
    process trains. Only rank 0 writes checkpoints.

    Args:
        model: its heads are trained in place.
        feats: features ``(N, V, D)`` with positions; must come from the model's backbone.
        cfg: epochs, batch size, learning rate, contrastive settings, seed.
        checkpoint_dir: where per-epoch checkpoints go (resumed from when present).
        device: where the heads train (default: the torchrun context's device, else the CPU); the
            features stay in host memory and go over batch by batch.

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
    if cfg.val_fraction > 0:
        fit_rows, val_rows = validation_split(feats.authors, cfg.val_fraction, cfg.seed)
        log.info("MvMF: %d photos for training, %d of other photographers to choose the epoch",
                 len(fit_rows), len(val_rows))
    else:
        fit_rows, val_rows = np.arange(n), np.zeros(0, np.int64)
    run_key = digest(canonical_json({"train": non_default(cfg), "model": non_default(model.config.heads),
                                     "cells": model.config.cells_fingerprint,
                                     "data": feats.backbone_fingerprint, "names": digest(*feats.names)}))
    ckpt = Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None, run_key)
    modules = {"mvmf": model.mvmf, "rrm": model.rrm}
    best_mvmf = copy.deepcopy(model.mvmf) if len(val_rows) else None
    if best_mvmf is not None:
        modules["mvmf_best"] = best_mvmf  # checkpointed too: a resumed run keeps the best head so far
    ckpt.resume(modules)
    history: dict[str, list[float]] = ckpt.state.get("history", {})
    bs = min(cfg.batch_size, n)
    ctx = distributed.context()
    dev = torch.device(device) if device is not None else ctx.device
    for m in modules.values():
        m.to(dev)
        distributed.broadcast_module(m)
    xyz = xyz.to(dev)

    # Phase 1: MvMF, NLL of the true coordinates.
    mv = model.mvmf
    other = [p for name, p in mv.named_parameters() if name != "log_kappa"]
    opt = torch.optim.AdamW([{"params": other, "weight_decay": cfg.weight_decay},
                             {"params": [mv.log_kappa], "weight_decay": 0.0}], lr=cfg.lr)
    lrs = [cfg.lr, cfg.lr * 10]

    n_fit, bs_fit = len(fit_rows), min(bs, len(fit_rows))

    def mvmf_batches(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        order = fit_rows[rng.permutation(n_fit)]
        return [(order[s:s + bs_fit], rng.integers(views, size=len(order[s:s + bs_fit])))
                for s in range(0, n_fit, bs_fit)]

    @torch.no_grad()
    def val_nll() -> float:
        """Held-out NLL of the plain view (every rank computes the same number)."""
        mv.eval()
        total = 0.0
        for s in range(0, len(val_rows), 4096):
            r = torch.from_numpy(val_rows[s:s + 4096])
            total += float(-mv.log_prob(mv(X[r, 0].to(dev).float()), xyz[r.to(dev)]).sum())
        mv.train()
        return total / len(val_rows)

    def keep_if_best() -> None:
        nll = val_nll()
        if nll < min(history["mvmf_val"]):  # ties keep the earlier head, as argmin reports
            best_mvmf.load_state_dict(mv.state_dict())
        history["mvmf_val"].append(nll)
        log.info("mvmf held-out NLL %.4f (best %.4f, epoch %d)", nll, min(history["mvmf_val"]),
                 int(np.argmin(history["mvmf_val"])))

    if best_mvmf is not None and "mvmf_val" not in history:
        history["mvmf_val"] = [val_nll()]  # epoch 0: the untrained head (the cells' prior) is a candidate

    def mvmf_step(batch: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        rows, v = batch
        f = X[torch.from_numpy(rows), torch.from_numpy(v)].to(dev).float()
        if not ctx.enabled:
            return mv.nll(mv(f), xyz[torch.from_numpy(rows)])
        # Dropout (and the optional hidden layer) on the whole batch draws the masks one process would;
        # the classifier and the likelihood run on this rank's slice only.
        lo, hi = distributed.shard_range(len(rows), ctx)
        h = mv.mlp(mv.dropout(f))[lo:hi]
        log_p = mv.log_prob(mv.fc(h), xyz[torch.from_numpy(rows[lo:hi])])
        return -log_p.sum() * (ctx.world_size / len(rows))

    _run_phase("mvmf", cfg.epochs, math.ceil(n_fit / bs_fit), mvmf_batches, mvmf_step, opt, lrs, ckpt, modules,
               cfg.seed, history, progress, [mv], sync_gradients=ctx.enabled,
               end_of_epoch=keep_if_best if best_mvmf is not None else None)
    if best_mvmf is not None:
        mv.load_state_dict(best_mvmf.state_dict())  # (a run resumed in the RRM phase has it already)
        log.info("MvMF: kept the head of epoch %d of %d (lowest held-out NLL)",
                 int(np.argmin(history["mvmf_val"])), cfg.epochs)

    # Phase 2: RRM, geodesic InfoNCE on anchor/partner pairs.
    rrm = model.rrm
    pos = positive_lists(feats.lat, feats.lon, authors, cfg.positive_km, cfg.same_author_positives)
    log.info("RRM: %d of %d photos have a geographic positive within %g km",
             sum(len(p) > 0 for p in pos), n, cfg.positive_km)
    opt = torch.optim.AdamW(rrm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    authors_t = torch.from_numpy(authors).to(dev)
    pairs = max(2, bs // 2)

    def rrm_step(batch: tuple[np.ndarray, ...]) -> torch.Tensor:
        idx, v, _, _ = batch
        it = torch.from_numpy(idx)
        if not ctx.enabled:
            emb = rrm(X[it, torch.from_numpy(v)].to(dev).float())
        else:  # embed this rank's slice; every rank computes the loss of the gathered batch
            lo, hi = distributed.shard_range(len(idx), ctx)
            emb = distributed.gather_rows(rrm(X[it[lo:hi], torch.from_numpy(v[lo:hi])].to(dev).float()))
        itd = it.to(dev)
        return geo_contrastive_loss(emb, xyz[itd], itd, authors_t[itd], cfg.positive_km, cfg.temperature,
                                    cfg.same_author_positives)

    _run_phase("rrm", cfg.rrm_epochs, math.ceil(n / pairs),
               lambda rng: _pair_batches(n, pairs, pos, views, rng), rrm_step, opt, [cfg.lr], ckpt, modules,
               cfg.seed, history, progress, [rrm], sync_gradients=ctx.enabled)
    model.eval()
    return history


class _FinetuneNet(nn.Module):
    """The backbone (under autocast on GPUs) then the heads in float32: the module DDP wraps."""

    def __init__(self, model: GeoModel, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, 3, S, S)`` -> ``(logits (B, C), embeddings (B, D))``."""
        assert self.model.backbone is not None
        with distributed.autocast(x.device, self.dtype):
            f = self.model.backbone(x)
        return self.model.heads(f.float())


def _finetune_setup(model: GeoModel, cfg: TrainConfig, device: str | torch.device | None, precision: str):
    """Device, (DDP-wrapped) network, optimizer, learning rates and fp16 loss scaler of a fine-tuning run."""
    ctx = distributed.context()
    dev = torch.device(device) if device is not None else ctx.device
    dtype = distributed.resolve_precision(dev, precision)
    if ctx.enabled and dev.type == "cuda":  # batch statistics over the global batch, as one process has them
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
    model.to(dev)
    net: nn.Module = _FinetuneNet(model, dtype)
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW([
        {"params": model.backbone.parameters(), "weight_decay": cfg.weight_decay},
        {"params": list(model.mvmf.parameters()) + list(model.rrm.parameters()), "weight_decay": cfg.weight_decay},
    ], lr=cfg.finetune_lr)
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    return dev, net, opt, [cfg.finetune_lr, cfg.finetune_lr * 10], scaler


def _finetune_loss(net: nn.Module, model: GeoModel, x: torch.Tensor | None, xyz: torch.Tensor, src: torch.Tensor,
                   author: torch.Tensor, cfg: TrainConfig, dev: torch.device) -> torch.Tensor:
    """MvMF NLL + geodesic InfoNCE of this rank's images ``x (b, 3, S, S)`` (None: all failed to decode).

    Under torchrun the NLL is scaled so that the mean over ranks is the global batch's mean, and the
    InfoNCE runs on the embeddings gathered from every rank.
    """
    ctx = distributed.context()
    if not ctx.enabled:
        if x is None or x.shape[0] < 2:
            return sum(p.sum() * 0.0 for p in model.mvmf.parameters())  # type: ignore[return-value]
        logits, emb = net(x.to(dev))
        xyz = xyz.to(dev)
        return model.mvmf.nll(logits, xyz) + geo_contrastive_loss(
            emb, xyz, src.to(dev), author.to(dev), cfg.positive_km, cfg.temperature, cfg.same_author_positives)
    n = int(distributed.all_reduce_sum(torch.tensor([0 if x is None else x.shape[0]])).item())
    real = x is not None
    if x is None:  # a stand-in image keeps every parameter in DDP's graph; its terms have weight 0
        size = model.config.backbone.preprocess.image_size
        x, xyz = torch.zeros(1, 3, size, size), torch.tensor([[0.0, 0.0, 1.0]])
        src, author = torch.tensor([-1]), torch.tensor([-1])
    logits, emb = net(x.to(dev))
    xyz = xyz.to(dev)
    log_p = model.mvmf.log_prob(logits, xyz)
    if n < 2:  # the same decision on every rank
        return (log_p.sum() + emb.sum()) * 0.0
    keep = slice(None) if real else slice(0, 0)
    nll = -log_p[keep].sum() * (ctx.world_size / n)
    con = geo_contrastive_loss(
        distributed.gather_rows(emb[keep]), distributed.gather_rows(xyz[keep]),
        distributed.gather_rows(src[keep].to(dev)), distributed.gather_rows(author[keep].to(dev)),
        cfg.positive_km, cfg.temperature, cfg.same_author_positives)
    return nll + con


def finetune(model: GeoModel, records: Sequence[Record], cfg: TrainConfig, checkpoint_dir: str | Path | None = None,
             progress: bool = True, num_workers: int = 0, device: str | torch.device | None = None,
             precision: str = "auto") -> dict[str, list[float]]:
    """End-to-end fine-tuning of backbone + heads on augmented images (MvMF NLL + geodesic InfoNCE).

    Slow on a CPU (minutes per epoch for a few thousand photos); meant for GPUs. Photos that fail to
    decode are skipped batch by batch. Under torchrun each rank decodes and runs its slice of every
    global batch (DDP; SyncBatchNorm on GPUs). ``precision``: autocast of the backbone on GPUs
    (``auto`` = bf16 where supported, else fp16; ``fp32``).
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
    run_key = digest(canonical_json({"finetune": non_default(cfg), "heads": non_default(model.config.heads),
                                     "cells": model.config.cells_fingerprint,
                                     "names": digest(*[r.image for r in records])}))
    ckpt = Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None, run_key)
    modules = {"backbone": model.backbone, "mvmf": model.mvmf, "rrm": model.rrm}
    ckpt.resume(modules)
    history: dict[str, list[float]] = ckpt.state.get("history", {})
    dev, net, opt, lrs, scaler = _finetune_setup(model, cfg, device, precision)
    modules["backbone"] = model.backbone  # SyncBatchNorm may have replaced it (same state dict)
    pairs = max(2, min(cfg.batch_size, n) // 2)
    authors_t = torch.from_numpy(authors)

    def step(batch: tuple[np.ndarray, ...]) -> torch.Tensor:
        idx = batch[0]
        lo, hi = distributed.shard_range(len(idx))
        items = [ds[int(i)] for i in idx[lo:hi]]
        ok = [(int(i), t) for i, t, _ in items if t is not None]
        it = torch.tensor([i for i, _ in ok], dtype=torch.long)
        x = torch.stack([t for _, t in ok]) if ok else None
        return _finetune_loss(net, model, x, xyz[it], it, authors_t[it], cfg, dev)

    def batches(rng: np.random.Generator) -> list:
        ds.epoch = int(rng.integers(1 << 30))
        return _pair_batches(n, pairs, pos, 1, rng)

    _run_phase("finetune", cfg.finetune_epochs, math.ceil(n / pairs), batches, step, opt, lrs, ckpt, modules,
               cfg.seed, history, progress, [model], scaler=scaler)
    model.config.backbone_finetuned = True
    model.eval()
    return history


def _author_hash(author: str) -> int:
    """A stable id for an author name (-1: unknown), for streams where no global author table exists."""
    return int(digest(author, length=15), 16) if author else -1


def finetune_shards(model: GeoModel, shards: str | Path | Sequence[str | Path], cfg: TrainConfig,
                    checkpoint_dir: str | Path | None = None, progress: bool = True, num_workers: int = 0,
                    device: str | torch.device | None = None, precision: str = "auto", samples: int | None = None,
                    shuffle_buffer: int = 1000) -> dict[str, list[float]]:
    """:func:`finetune` streamed from WebDataset shards, for data sets too large to index in memory.

    A step's global batch holds ``batch_size // 2`` photos with two augmented views each (the views are
    each other's positives, as are photos of the batch taken within ``positive_km``). Every epoch the
    shards are reshuffled and dealt round-robin to the ranks and their DataLoader workers; each rank
    streams its own shards (cycling them) and contributes its share of every batch. An epoch is
    ``samples // (batch_size // 2)`` steps; ``samples`` defaults to the count in ``shards.json`` (else
    the shards are counted). Epoch ``e`` depends only on ``(seed, e)``, so a killed run resumes from its
    last per-epoch checkpoint.
    """
    from .shards import ShardDataset, collate_samples, count_samples, resolve_shards

    if model.backbone is None:
        raise InputError("fine-tuning needs a model with a backbone")
    urls = resolve_shards(shards)
    ctx = distributed.context()
    if len(urls) < ctx.world_size:
        raise InputError(f"{len(urls)} shards cannot feed {ctx.world_size} ranks; write smaller shards")
    total = samples if samples is not None else count_samples(urls)
    photos = max(2, cfg.batch_size // 2)
    lo, hi = distributed.shard_range(photos, ctx)
    if hi <= lo:
        raise InputError(f"a batch of {photos} photos cannot be split over {ctx.world_size} ranks")
    steps = max(1, total // photos)
    ds = ShardDataset(urls, model.config.backbone.preprocess, views=2, seed=cfg.seed, train_augment=True,
                      shuffle=True, shuffle_buffer=shuffle_buffer, repeat=True)
    run_key = digest(canonical_json({"finetune": non_default(cfg), "heads": non_default(model.config.heads),
                                     "cells": model.config.cells_fingerprint, "samples": total,
                                     "shards": digest(*[Path(u).name for u in urls])}))
    ckpt = Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None, run_key)
    modules = {"backbone": model.backbone, "mvmf": model.mvmf, "rrm": model.rrm}
    ckpt.resume(modules)
    history: dict[str, list[float]] = ckpt.state.get("history", {})
    dev, net, opt, lrs, scaler = _finetune_setup(model, cfg, device, precision)
    modules["backbone"] = model.backbone
    skipped: list[tuple[str, str]] = []

    def step(batch: Any) -> torch.Tensor:
        orders, x, metas, bad = batch
        skipped.extend((m.image, str(e)) for _, m, e in bad)
        if x is None:
            return _finetune_loss(net, model, None, torch.zeros(0, 3), orders, orders, cfg, dev)
        xyz = torch.from_numpy(latlon_to_xyz(np.array([m.lat for m in metas]), np.array([m.lon for m in metas])))
        author = torch.tensor([_author_hash(m.author) for m in metas], dtype=torch.long)
        two = 2 * torch.ones(len(metas), dtype=torch.long)  # (b, 2, 3, S, S) -> (2b, 3, S, S), views adjacent
        return _finetune_loss(net, model, x.flatten(0, 1), xyz.float().repeat_interleave(two, 0),
                              orders.repeat_interleave(two), author.repeat_interleave(two), cfg, dev)

    def batches(rng: np.random.Generator) -> Any:
        ds.set_epoch(int(rng.integers(1 << 30)))
        loader = torch.utils.data.DataLoader(ds, batch_size=hi - lo, num_workers=num_workers,
                                             collate_fn=collate_samples)
        return itertools.islice(loader, steps)

    _run_phase("finetune", cfg.finetune_epochs, steps, batches, step, opt, lrs, ckpt, modules, cfg.seed, history,
               progress, [model], scaler=scaler)
    if skipped:
        log.warning("fine-tuning skipped %d unreadable samples (rank %d), e.g. %s: %s", len(skipped), ctx.rank,
                    *skipped[0])
    model.config.backbone_finetuned = True
    model.eval()
    return history

