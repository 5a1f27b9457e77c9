"""Saying when an estimate is no better than the model's prior: the divergence from the prior, the rule, and on
the embedded model's development photos, most estimates called prior-like and the Venice ones (whose gallery
neighbours agree) not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoswc import Geolocator
from geoswc.core.sphere import haversine_km
from geoswc.prediction.results import Prediction, format_text, prediction_row
from geoswc.prediction.swc import PriorRule, cell_prior, prior_divergence

from .conftest import DEV_IMAGES, dev_rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1e4, allow_nan=False), min_size=1, max_size=40), st.floats(0.01, 5.0))
def test_the_prior_is_a_distribution_and_the_divergence_from_it_is_zero_only_there(counts, alpha):
    q = cell_prior(counts, alpha)
    assert q.shape == (len(counts),) and np.all(q > 0) and q.sum() == pytest.approx(1.0)
    assert prior_divergence(q, q) == pytest.approx(0.0, abs=1e-12)
    p = np.zeros(len(counts))
    p[int(np.argmin(q))] = 1.0  # all mass on the least expected cell: the most surprising answer
    assert prior_divergence(p, q) == pytest.approx(-np.log(q.min())) and prior_divergence(p, q) >= 0


def test_the_rule_needs_both_a_small_divergence_and_no_agreeing_cluster():
    rule = PriorRule(kl_nats=1.0, cluster_share=0.3, cluster_similarity=0.35)
    agree = {"cluster_size": 0.3, "cluster_similarity": 0.35}
    assert rule.prior_like(0.2, {}) and rule.prior_like(0.2, {"cluster_size": 0.9, "cluster_similarity": 0.2})
    assert not rule.prior_like(0.2, agree) and not rule.prior_like(1.0, {})


def test_the_outputs_say_it(tmp_path):
    geo = Geolocator.load()
    (p,) = geo.predict_features(torch.zeros(1, geo.model.config.backbone.feature_dim), "swc", names=["x"])
    assert isinstance(p, Prediction) and p.prior_kl is not None and p.prior_kl >= 0
    p.prior_like = True
    assert "no better than the model's prior" in format_text(p) and prediction_row(p)["prior_like"] is True
    p.prior_like = False
    assert "prior" not in format_text(p).split("top cells")[0].split("cell ")[1]


@pytest.mark.shared_data
@pytest.mark.slow
def test_on_the_development_photos_most_estimates_are_the_prior_and_venice_is_not():
    rows = dev_rows()
    lat, lon = (np.array([float(r[k]) for r in rows]) for k in ("lat", "lon"))
    venice = haversine_km(lat, lon, 45.4341, 12.3388) < 5
    picked = [i for i in range(len(rows)) if venice[i] or i % 15 == 0]
    geo = Geolocator.load()
    names = [rows[i]["image"] for i in picked]
    out = {
        r.image: r
        for r in geo.locate_batch([DEV_IMAGES / n for n in names], names=names, with_place=False, batch_size=32)
    }
    ven = [bool(out[rows[i]["image"]].prior_like) for i in picked if venice[i]]
    rest = [bool(out[rows[i]["image"]].prior_like) for i in picked if not venice[i]]
    assert len(ven) >= 20 and len(rest) >= 100
    assert np.mean(rest) >= 0.8, np.mean(rest)  # the model's answer for almost any photo: said so
    assert np.mean(ven) <= 0.5, np.mean(ven)  # gallery photos agree on Venice: not called the prior
