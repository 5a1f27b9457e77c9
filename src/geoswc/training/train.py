"""Training the heads on cached features: the MvMF head (negative log-likelihood of the true positions)
and the RRM (geodesic InfoNCE). End-to-end fine-tuning of the backbone is :mod:`geoswc.training.finetune`.

Runs are resumable and deterministic (see :mod:`geoswc.training.checkpoint`); under torchrun every rank builds the
same global batches, computes its slice, and the gradients are averaged, so N processes train the model
one process trains.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geoswc.core import distributed
from geoswc.core.config import TrainConfig, digest, non_default
from geoswc.core.errors import InputError, building
from geoswc.core.sphere import latlon_to_xyz
from geoswc.data.splits import validation_split
from geoswc.models import compat
from geoswc.models.geomodel import GeoModel
from geoswc.models.heads import geo_contrastive_loss
from geoswc.training.checkpoint import Checkpointer, Phase, run_key, run_phase
from geoswc.training.features import FeatureSet
from geoswc.training.positives import PositiveSampler

log = logging.getLogger(__name__)


def author_ids(authors: Sequence[str]) -> np.ndarray:
    """A small integer per author name ``(N,)`` (-1: no author, never matched)."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(a, len(ids)) if a else -1 for a in authors], np.int64)


def pair_batches(
    n: int, batch_pairs: int, positives: PositiveSampler, views: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Anchor/partner batches ``(rows, views, anchors, partners)`` of one epoch: every photo is an anchor once;
    its partner is a geographic positive when one is drawn (with several views, 3 times in 4), else another view
    of the anchor (or a random photo when there is only one view)."""
    order = rng.permutation(n)
    partners = positives.sample(order, rng)
    use = partners >= 0
    if views > 1:
        use &= rng.random(n) < 0.75
        partners = np.where(use, partners, order)
    else:
        partners = np.where(use, partners, rng.integers(n, size=n))
    v_a, v_p = rng.integers(views, size=n), rng.integers(views, size=n)
    if views > 1:  # two views of one photo must differ
        same = partners == order
        v_p[same] = (v_a[same] + 1 + rng.integers(views - 1, size=int(same.sum()))) % views
    batches = []
    for s in range(0, n, batch_pairs):
        a, p = order[s : s + batch_pairs], partners[s : s + batch_pairs]
        if len(a) >= 2:
            batches.append(
                (np.concatenate([a, p]), np.concatenate([v_a[s : s + batch_pairs], v_p[s : s + batch_pairs]]), a, p)
            )
    return batches


class _MvMFSlice(nn.Module):
    """The MvMF head as DDP runs it: dropout (and the optional hidden layer) on the whole global batch, drawing
    the masks one process would, then the classifier and the likelihood on this rank's rows ``[lo, hi)``."""

    def __init__(self, mvmf: nn.Module) -> None:
        super().__init__()
        self.mvmf = mvmf

    def forward(self, features: torch.Tensor, xyz: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``features (B, D)``, true positions of the slice ``xyz (hi - lo, 3)`` -> log densities ``(hi - lo,)``."""
        mv = self.mvmf
        return mv.log_prob(mv.fc(mv.mlp(mv.dropout(features))[lo:hi]), xyz)


class _HeadTraining:
    """The state shared by the two phases of :func:`train_heads`: features ``(N, V, D)``, positions, authors,
    the hold-out split, the device and the checkpointer."""

    def __init__(
        self,
        model: GeoModel,
        feats: FeatureSet,
        cfg: TrainConfig,
        checkpoint_dir: str | Path | None,
        device: str | torch.device | None,
    ) -> None:
        self.model, self.feats, self.cfg = model, feats, cfg
        self.X = feats.features
        self.n, self.views = self.X.shape[0], self.X.shape[1]
        self.authors = author_ids(feats.authors)
        if cfg.val_fraction > 0:
            self.fit_rows, self.val_rows = validation_split(feats.authors, cfg.val_fraction, cfg.seed)
            log.info(
                "MvMF: %d photos for training, %d of other photographers to choose the epoch",
                len(self.fit_rows),
                len(self.val_rows),
            )
        else:
            self.fit_rows, self.val_rows = np.arange(self.n), np.zeros(0, np.int64)
        self.best_mvmf = copy.deepcopy(model.mvmf) if len(self.val_rows) else None
        modules = {"mvmf": model.mvmf, "rrm": model.rrm}
        if self.best_mvmf is not None:
            modules["mvmf_best"] = self.best_mvmf  # checkpointed too: a resumed run keeps the best head so far
        key = run_key(
            train=non_default(cfg),
            model=non_default(model.config.heads),
            cells=model.config.cells_fingerprint,
            data=feats.backbone_fingerprint,
            names=digest(*feats.names),
        )
        self.ckpt = Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None, key, modules)
        self.ckpt.resume()
        self.history: dict[str, list[float]] = self.ckpt.state.get("history", {})
        # A command's engine (under torchrun: DDP, which starts every rank from rank 0's weights), else one here.
        self.eng = distributed.engine_for(str(device) if device is not None else "cpu", "fp32")
        self.dev = self.eng.device
        for m in modules.values():
            m.to(self.dev)
        self.xyz = torch.from_numpy(latlon_to_xyz(feats.lat, feats.lon)).float().to(self.dev)
        self.batch_size = min(cfg.batch_size, self.n)
        self.positives: PositiveSampler | None = None

    # -- phase 1: MvMF, NLL of the true positions ------------------------------------------------------

    def mvmf_phase(self) -> Phase:
        mv, cfg = self.model.mvmf, self.cfg
        other = [p for name, p in mv.named_parameters() if name != "log_kappa"]
        opt = torch.optim.AdamW(
            [{"params": other, "weight_decay": cfg.weight_decay}, {"params": [mv.log_kappa], "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        if self.best_mvmf is not None and "mvmf_val" not in self.history:
            self.history["mvmf_val"] = [self.val_nll()]  # epoch 0: the untrained head (the cells' prior) competes
        bs = min(self.batch_size, len(self.fit_rows))
        self.mvmf_net, opt = self.eng.setup(_MvMFSlice(mv), opt)
        return Phase(
            "mvmf",
            cfg.epochs,
            cfg.steps(math.ceil(len(self.fit_rows) / bs)),
            self.mvmf_batches,
            self.mvmf_loss,
            opt,
            [cfg.lr, cfg.lr * 10],
            [mv],
            self.eng,
            end_of_epoch=self.keep_if_best if self.best_mvmf is not None else None,
        )

    def mvmf_batches(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(rows, views)`` of each step: the training photos in a random order, one random view each."""
        bs = min(self.batch_size, len(self.fit_rows))
        order = self.fit_rows[rng.permutation(len(self.fit_rows))]
        return [
            (order[s : s + bs], rng.integers(self.views, size=len(order[s : s + bs]))) for s in range(0, len(order), bs)
        ]

    def mvmf_loss(self, batch: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        rows, v = batch
        f = self.X[torch.from_numpy(rows), torch.from_numpy(v)].to(self.dev).float()
        lo, hi = distributed.shard_range(len(rows), self.eng)
        log_p = self.mvmf_net(f, self.xyz[torch.from_numpy(rows[lo:hi])], lo, hi)
        # Each rank's share of the global batch's mean NLL (in one process: exactly the mean).
        return -log_p.sum() / (len(rows) / self.eng.world_size)

    @torch.no_grad()
    def val_nll(self) -> float:
        """Held-out NLL of the plain view (every rank computes the same number)."""
        mv = self.model.mvmf
        mv.eval()
        total = 0.0
        for s in range(0, len(self.val_rows), 4096):
            r = torch.from_numpy(self.val_rows[s : s + 4096])
            total += float(-mv.log_prob(mv(self.X[r, 0].to(self.dev).float()), self.xyz[r.to(self.dev)]).sum())
        mv.train()
        return total / len(self.val_rows)

    def keep_if_best(self) -> None:
        nll, seen = self.val_nll(), self.history["mvmf_val"]
        if nll < min(seen):  # ties keep the earlier head, as argmin reports
            self.best_mvmf.load_state_dict(self.model.mvmf.state_dict())  # type: ignore[union-attr]
        seen.append(nll)
        log.info("mvmf held-out NLL %.4f (best %.4f, epoch %d)", nll, min(seen), int(np.argmin(seen)))

    # -- phase 2: RRM, geodesic InfoNCE on anchor/partner pairs ----------------------------------------

    def rrm_phase(self) -> Phase:
        cfg = self.cfg
        opt = torch.optim.AdamW(self.model.rrm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.authors_t = torch.from_numpy(self.authors).to(self.dev)
        pairs = max(2, self.batch_size // 2)
        self.rrm_net, opt = self.eng.setup(self.model.rrm, opt)
        return Phase(
            "rrm",
            cfg.rrm_epochs,
            cfg.steps(math.ceil(self.n / pairs)),
            self.rrm_batches,
            self.rrm_loss,
            opt,
            [cfg.lr],
            [self.model.rrm],
            self.eng,
        )

    def rrm_batches(self, rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
        """One epoch's anchor/partner batches; the positive sampler is built on the first call (not at all when
        the phase has no epoch to run)."""
        if self.positives is None:
            self.positives = PositiveSampler(
                self.feats.lat, self.feats.lon, self.authors, self.cfg.positive_km, self.cfg.same_author_positives
            )
        return pair_batches(self.n, max(2, self.batch_size // 2), self.positives, self.views, rng)

    def rrm_loss(self, batch: tuple[np.ndarray, ...]) -> torch.Tensor:
        idx, v, _, _ = batch
        it, cfg = torch.from_numpy(idx), self.cfg
        # Each rank embeds its slice; every rank computes the loss of the gathered batch.
        lo, hi = distributed.shard_range(len(idx), self.eng)
        emb = self.eng.gather_rows(self.rrm_net(self.X[it[lo:hi], torch.from_numpy(v[lo:hi])].to(self.dev).float()))
        itd = it.to(self.dev)
        return geo_contrastive_loss(
            emb, self.xyz[itd], itd, self.authors_t[itd], cfg.positive_km, cfg.temperature, cfg.same_author_positives
        )


def train_heads(
    model: GeoModel,
    feats: FeatureSet,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, list[float]]:
    """Train the MvMF head and the RRM of ``model`` on cached features (the backbone is not touched).

    Under torchrun every rank builds the same global batches; each computes the loss terms of its slice
    (the MvMF dropout masks are drawn for the whole batch, and the RRM's InfoNCE runs on the gathered
    embeddings of the whole batch) and the gradients are averaged. Only rank 0 writes checkpoints.

    Args:
        model: its heads are trained in place.
        feats: features ``(N, V, D)`` with positions; must come from the model's backbone.
        cfg: epochs, batch size, learning rate, contrastive settings, seed.
        checkpoint_dir: where per-epoch checkpoints go (resumed from when present).
        device: where the heads train when no engine was started (default: the CPU; a command's engine, see
            :func:`~geoswc.core.distributed.start`, decides otherwise); the features stay in host memory and go
            over batch by batch.

    Returns:
        Mean loss per epoch of each phase (``mvmf_val``: the held-out NLL of each candidate head).
    """
    if len(feats) < 2:
        raise InputError(f"training needs at least 2 photos, got {len(feats)}")
    compat.check(model, features=feats)
    with building(f"the training set-up of {len(feats):,} photos and {len(model.cells):,} cells"):
        run = _HeadTraining(model, feats, cfg, checkpoint_dir, device)
    run_phase(run.mvmf_phase(), run.ckpt, cfg.seed, run.history, progress)
    if run.best_mvmf is not None:
        model.mvmf.load_state_dict(run.best_mvmf.state_dict())  # (a run resumed in the RRM phase has it already)
        log.info(
            "MvMF: kept the head of epoch %d of %d (lowest held-out NLL)",
            int(np.argmin(run.history["mvmf_val"])),
            cfg.epochs,
        )
    run_phase(run.rrm_phase(), run.ckpt, cfg.seed, run.history, progress)
    model.eval()
    return run.history
