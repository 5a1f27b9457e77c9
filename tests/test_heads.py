import math

import numpy as np
import pytest
import torch

from geoswc.core.sphere import latlon_to_xyz
from geoswc.models.heads import (
    MvMFHead,
    ResidualRetrievalModule,
    geo_contrastive_loss,
    kappa_from_spread,
    log_vmf_normalizer,
    vmf_log_density,
)


def sphere_grid(n_lat=720, n_lon=1440):
    """Midpoint grid over the sphere: unit vectors (M, 3) and their solid angles (M,), float64."""
    dlat, dlon = math.pi / n_lat, 2 * math.pi / n_lon
    lat = -math.pi / 2 + dlat * (np.arange(n_lat) + 0.5)
    lon = -math.pi + dlon * (np.arange(n_lon) + 0.5)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    xyz = latlon_to_xyz(np.degrees(la), np.degrees(lo)).reshape(-1, 3)
    area = (np.cos(la) * dlat * dlon).reshape(-1)
    return torch.from_numpy(xyz), torch.from_numpy(area)


@pytest.mark.parametrize("kappa", [0.01, 1.0, 10.0, 200.0])
def test_vmf_density_integrates_to_one(kappa):
    xyz, area = sphere_grid()
    mu = torch.tensor([[0.3, -0.4, math.sqrt(1 - 0.25)]], dtype=torch.float64)
    dens = vmf_log_density(xyz, mu, torch.tensor([kappa], dtype=torch.float64)).exp()[:, 0]
    assert float((dens * area).sum()) == pytest.approx(1.0, rel=2e-3)


def test_normalizer_matches_closed_form_and_is_stable():
    k = torch.tensor([1e-4, 0.5, 3.0, 50.0], dtype=torch.float64)
    expected = torch.log(k / (4 * math.pi * torch.sinh(k)))
    assert torch.allclose(log_vmf_normalizer(k), expected, rtol=1e-10)
    big = log_vmf_normalizer(torch.tensor([1e3, 1e6, 1e9], dtype=torch.float32))
    assert torch.isfinite(big).all()  # sinh(1e3) overflows; the log-space form does not


def test_large_concentration_density_does_not_underflow():
    # Cells of ~1 km: kappa ~ 8e7. The naive density exp(kappa mu.x) / ... underflows to 0 -> log = -inf.
    mu = torch.from_numpy(latlon_to_xyz([48.8566], [2.3522])).float()
    kappa = kappa_from_spread(torch.tensor([1.0]))
    assert kappa.item() > 1e7
    x_near = torch.from_numpy(latlon_to_xyz([48.8576], [2.3522])).float()  # 111 m north
    x_far = torch.from_numpy(latlon_to_xyz([-33.86], [151.2])).float()  # Sydney
    near, far = vmf_log_density(x_near, mu, kappa), vmf_log_density(x_far, mu, kappa)
    assert torch.isfinite(near).all() and torch.isfinite(far).all()
    assert near.item() > far.item()
    naive = kappa * (x_far @ mu.T) + log_vmf_normalizer(kappa)
    assert torch.exp(naive).item() == 0.0  # what the log space saves us from


def test_mvmf_mixture_integrates_to_one_and_gradients_are_finite():
    torch.manual_seed(0)
    centroids = torch.from_numpy(latlon_to_xyz([0, 45, -30], [0, 90, -120])).float()
    head = MvMFHead(8, centroids, torch.tensor([5.0, 20.0, 80.0]))
    logits = head(torch.randn(2, 8)).detach()
    assert logits.shape == (2, 3)
    xyz, area = sphere_grid(360, 720)
    with torch.no_grad():
        lp = head.log_prob(logits[:1].double().expand(len(xyz), 3), xyz.float())
    assert float((lp.double().exp() * area).sum()) == pytest.approx(1.0, rel=5e-3)
    # training at extreme concentrations keeps finite gradients
    head2 = MvMFHead(8, centroids, torch.tensor([1e8, 1e8, 1e8]))
    loss = head2.nll(head2(torch.randn(4, 8)), torch.from_numpy(latlon_to_xyz([1, 2, 3, 4], [5, 6, 7, 8])).float())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in head2.parameters())


def test_mvmf_prior_bias():
    prior = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    head = MvMFHead(4, torch.eye(3), torch.ones(3), log_prior=prior)
    probs = torch.softmax(head(torch.zeros(1, 4)), -1)[0]
    assert torch.allclose(probs, torch.tensor([0.7, 0.2, 0.1]), atol=1e-6)


def test_rrm_shapes_unit_norm_and_identity_start():
    rrm = ResidualRetrievalModule(16)
    x = torch.randn(5, 16)
    e = rrm(x)
    assert e.shape == (5, 16)
    assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    # fc2 starts at zero: the output is the normalised LayerNorm of the LayerNorm of the input
    ln = torch.nn.functional.layer_norm
    ref = torch.nn.functional.normalize(ln(ln(x, (16,)), (16,)), dim=-1)
    assert torch.allclose(e, ref, atol=1e-5)


def test_contrastive_loss_prefers_geographic_positives():
    xyz = torch.from_numpy(latlon_to_xyz([48.85, 48.86, -33.86, -33.87], [2.35, 2.34, 151.2, 151.21])).float()
    src = torch.arange(4)
    author = torch.tensor([0, 1, 2, 3])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.05], [0, 1], [0.05, 1]]), dim=-1)
    bad = good[[0, 2, 1, 3]]
    lg = geo_contrastive_loss(good, xyz, src, author, 25.0, 0.1)
    lb = geo_contrastive_loss(bad, xyz, src, author, 25.0, 0.1)
    assert lg < lb
    # same author nearby: ignored, so no anchor has a positive -> zero loss
    same = torch.tensor([0, 0, 1, 1])
    assert geo_contrastive_loss(good, xyz, src, same, 25.0, 0.1).item() == 0.0
    assert geo_contrastive_loss(good, xyz, src, same, 25.0, 0.1, same_author_positives=True) > 0
