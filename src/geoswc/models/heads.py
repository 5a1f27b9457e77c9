"""The two heads on the backbone features: the Mixture of von Mises-Fisher classifier and the Residual
Retrieval Module, plus the geodesic contrastive loss that trains the latter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from geoswc.core.sphere import EARTH_RADIUS_KM

LOG_2PI = math.log(2.0 * math.pi)


def log_vmf_normalizer(kappa: torch.Tensor) -> torch.Tensor:
    """``log C(kappa)`` of the vMF on the 2-sphere, ``C = kappa / (4 pi sinh kappa)``, for any kappa > 0.

    Written as ``log kappa - log 2pi - kappa - log(1 - exp(-2 kappa))`` so it neither overflows for large
    kappa (sinh) nor loses precision for small kappa (``expm1``).
    """
    return _log_normalizer_plus_kappa(kappa) - kappa


def _log_normalizer_plus_kappa(kappa: torch.Tensor) -> torch.Tensor:
    """``log C(kappa) + kappa``, computed without forming ``log C`` (which would lose float32 precision when
    kappa is large and is then added back)."""
    return torch.log(kappa) - LOG_2PI - torch.log(-torch.expm1(-2.0 * kappa))


def vmf_log_density(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """Log density (per steradian) of unit vectors ``x (B, 3)`` under vMFs ``mu (C, 3)``, ``kappa (C,)``.

    Returns:
        ``(B, C)``. Uses ``log C + kappa (mu.x - 1)`` with ``mu.x - 1 = -|mu - x|^2 / 2``, which keeps
        float32 precision for the tiny angles that come with large concentrations.
    """
    sq = (x[:, None, :] - mu[None, :, :]).pow(2).sum(-1)  # (B, C)
    return _log_normalizer_plus_kappa(kappa)[None, :] - 0.5 * kappa[None, :] * sq


def kappa_from_spread(spread_km: torch.Tensor, floor_km: float = 1.0) -> torch.Tensor:
    """Concentration matching an RMS angular spread: for large kappa a vMF is a 2-D Gaussian with
    ``E[theta^2] = 2 / kappa``."""
    theta = spread_km.clamp_min(floor_km) / EARTH_RADIUS_KM
    return 2.0 / theta.pow(2)


class MvMFHead(nn.Module):
    """Mixture of von Mises-Fisher distributions over the sphere, one component per cell.

    The mean directions are fixed at the cells' photo centroids; the concentrations are learned (in log
    space); the mixture weights are a (linear, by default) function of the image features.

    Args:
        in_dim: feature width D.
        centroids_xyz: ``(C, 3)`` unit vectors of the cell centroids.
        kappa_init: ``(C,)`` initial concentrations.
        log_prior: ``(C,)`` optional initial bias (log share of photos per cell).
        hidden: 0 for a linear layer, else the width of one hidden layer.
        dropout: dropout on the features during training.
    """

    def __init__(
        self,
        in_dim: int,
        centroids_xyz: torch.Tensor,
        kappa_init: torch.Tensor,
        log_prior: torch.Tensor | None = None,
        hidden: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        num_cells = centroids_xyz.shape[0]
        self.register_buffer("mu", F.normalize(centroids_xyz.float(), dim=-1))
        self.log_kappa = nn.Parameter(torch.log(kappa_init.float()))
        self.dropout = nn.Dropout(dropout)
        if hidden > 0:
            self.mlp: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
            fc_in = hidden
        else:
            self.mlp = nn.Identity()
            fc_in = in_dim
        self.fc = nn.Linear(fc_in, num_cells)
        nn.init.normal_(self.fc.weight, std=0.01)
        with torch.no_grad():
            self.fc.bias.copy_(log_prior if log_prior is not None else torch.zeros(num_cells))

    @property
    def kappa(self) -> torch.Tensor:
        return self.log_kappa.exp()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Mixture logits ``(B, C)`` from features ``(B, D)``; ``log_softmax`` gives log cell weights."""
        return self.fc(self.mlp(self.dropout(features)))

    def log_prob(self, logits: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """Log density of the true positions ``xyz (B, 3)`` under the mixture, ``(B,)`` (logsumexp)."""
        log_w = F.log_softmax(logits, dim=-1)
        return torch.logsumexp(log_w + vmf_log_density(xyz, self.mu, self.kappa), dim=-1)

    def nll(self, logits: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the true positions, the training loss."""
        return -self.log_prob(logits, xyz).mean()


class ResidualRetrievalModule(nn.Module):
    """LayerNorm -> (FC-ReLU-FC + skip) -> LayerNorm -> L2-normalise: ``(B, D)`` -> ``(B, D)`` unit vectors.

    The second FC starts at zero, so an untrained module is a normalised copy of the features.
    """

    def __init__(self, dim: int, hidden: int = 0) -> None:
        super().__init__()
        hidden = hidden or dim
        self.norm_in = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm_out = nn.LayerNorm(dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.norm_in(features)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return F.normalize(self.norm_out(h), dim=-1)


def geo_contrastive_loss(
    emb: torch.Tensor,
    xyz: torch.Tensor,
    source: torch.Tensor,
    author: torch.Tensor,
    positive_km: float,
    temperature: float,
    same_author_positives: bool = False,
) -> torch.Tensor:
    """Multi-positive InfoNCE where positives are defined by geodesic distance.

    For anchor i, the positives are the other views of the same photo and the photos taken within
    ``positive_km``; every other item in the batch is a negative. Unless ``same_author_positives``, a
    nearby photo of the same author is ignored (neither positive nor negative), so the module learns
    places rather than photographers.

    Args:
        emb: ``(B, D)`` unit embeddings.
        xyz: ``(B, 3)`` unit position vectors.
        source: ``(B,)`` photo index (views of one photo share it).
        author: ``(B,)`` author id (-1 when unknown, never matched).
        positive_km, temperature: see :class:`~geoswc.core.config.TrainConfig`.

    Returns:
        Scalar loss averaged over anchors that have at least one positive (0 if none has).
    """
    b = emb.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=emb.device)
    cos = (xyz @ xyz.T).clamp(-1.0, 1.0)
    near = cos >= math.cos(min(positive_km / EARTH_RADIUS_KM, math.pi))
    same_src = source[:, None] == source[None, :]
    same_author = (author[:, None] == author[None, :]) & (author[:, None] >= 0)
    pos = same_src | (near if same_author_positives else near & ~same_author)
    ignore = eye | (~same_src & near & same_author & (not same_author_positives))
    pos = pos & ~ignore
    logits = (emb @ emb.T) / temperature
    logits = logits.masked_fill(ignore, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return emb.sum() * 0.0
    per_anchor = -(log_p.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has])
    return per_anchor.mean()
