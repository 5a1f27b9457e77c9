"""Training: losses go down, runs are reproducible, checkpoints resume, and fine-tuning runs end to end."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoswc.core import distributed
from geoswc.core.config import ModelConfig, TrainConfig
from geoswc.core.errors import InputError
from geoswc.core.sphere import haversine_km, latlon_to_xyz
from geoswc.data.records import read_photo_csv
from geoswc.data.splits import validation_split
from geoswc.geo.cells import CellTable
from geoswc.models.geomodel import GeoModel
from geoswc.training.features import FeatureSet
from geoswc.training.positives import PositiveSampler
from geoswc.training.train import train_heads

from .conftest import DEV_IMAGES


def _setup(ws, **kw):
    fs = FeatureSet.load(ws["features"])
    cells = CellTable.load(ws["cells"])
    cfg = TrainConfig(**({"epochs": 4, "rrm_epochs": 4, "batch_size": 16} | kw))
    return fs, cells, cfg, GeoModel(ModelConfig(backbone=fs.backbone, train=cfg), cells)


def test_losses_decrease_and_runs_are_deterministic(tiny_workspace):
    fs, cells, cfg, m1 = _setup(tiny_workspace, lr=3e-3)
    h1 = train_heads(m1, fs, cfg, progress=False)
    assert h1["mvmf"][-1] < h1["mvmf"][0]
    assert h1["rrm"][-1] < h1["rrm"][0]
    _, _, _, m2 = _setup(tiny_workspace, lr=3e-3)
    untrained = m2.fingerprint
    train_heads(m2, fs, cfg, progress=False)
    assert m1.fingerprint == m2.fingerprint != untrained  # same seed, same weights, bit for bit


def test_no_rrm_epochs_skip_the_phase_and_its_set_up(tiny_workspace, monkeypatch):
    import geoswc.training.train

    def refuse(*a, **k):
        raise AssertionError("the positive sampler was built for a phase with no epoch")

    monkeypatch.setattr(geoswc.training.train, "PositiveSampler", refuse)
    fs, cells, cfg, m = _setup(tiny_workspace, epochs=1, rrm_epochs=0)
    rrm_before = {k: v.clone() for k, v in m.rrm.state_dict().items()}
    history = train_heads(m, fs, cfg, progress=False)
    assert "rrm" not in history and all(torch.equal(v, m.rrm.state_dict()[k]) for k, v in rrm_before.items())


def test_the_fingerprint_follows_the_weights(tiny_workspace, tmp_path):
    """Fingerprints are computed from the current weights: never stale after training or an edit."""
    fs, cells, cfg, m = _setup(tiny_workspace, epochs=1, rrm_epochs=1)
    before = m.fingerprint
    train_heads(m, fs, cfg, progress=False)
    trained = m.fingerprint
    assert trained != before and m.save(tmp_path / "m") == trained == GeoModel.load(tmp_path / "m").fingerprint
    with torch.no_grad():
        m.rrm.fc1.bias[0] += 1.0  # an in-place edit of one weight
    assert m.fingerprint not in (trained, before)
    assert m.gallery_identity.model_fingerprint == m.fingerprint


def test_resume_from_checkpoint_matches_uninterrupted(tiny_workspace, tmp_path):
    fs, cells, cfg, full = _setup(tiny_workspace)
    train_heads(full, fs, cfg, progress=False)
    # an "interrupted" run: 2 of 4 MvMF epochs, checkpointed ...
    short = TrainConfig(**{**cfg.__dict__, "epochs": 4})
    _, _, _, part = _setup(tiny_workspace)
    ckpt = tmp_path / "ckpt"

    class Stop(Exception):
        pass

    calls = {"n": 0}
    orig = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 9:  # dies during the third epoch
            raise Stop
        return orig(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        with pytest.raises(Stop):
            train_heads(part, fs, short, checkpoint_dir=ckpt, progress=False)
    finally:
        torch.optim.AdamW.step = orig
    # ... re-run with the same command: a fresh process would build a fresh model
    _, _, _, resumed = _setup(tiny_workspace)
    train_heads(resumed, fs, short, checkpoint_dir=ckpt, progress=False)
    assert resumed.fingerprint == full.fingerprint


def test_validation_split_holds_out_whole_photographers():
    authors = ["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["", ""] + ["d"]
    fit, val = validation_split(authors, 0.4, seed=0)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(len(authors)))
    assert not {authors[i] for i in fit if authors[i]} & {authors[i] for i in val if authors[i]}
    # 6 groups (4 authors + 2 photos without one): ceil(0.4 * 6) = 3 held out
    groups = {authors[i] or f"#{i}" for i in val}
    assert len(groups) == 3
    assert np.array_equal(val, validation_split(authors, 0.4, seed=0)[1])  # seeded
    assert any(not np.array_equal(val, validation_split(authors, 0.4, seed=s)[1]) for s in range(1, 6))
    with pytest.raises(InputError, match="no training"):
        validation_split(["a", "a", "b"], 0.9, seed=0)


def test_val_fraction_keeps_the_head_with_the_lowest_held_out_nll(tiny_workspace):
    """Every MvMF epoch, and the untrained head, is scored on held-out photographers; the model ends with
    the best of them (an overfitting head is not kept)."""
    fs, cells, cfg, m = _setup(tiny_workspace, val_fraction=0.3, lr=3e-3, rrm_epochs=1)
    h = train_heads(m, fs, cfg, progress=False)
    assert len(h["mvmf_val"]) == cfg.epochs + 1 and len(h["mvmf"]) == cfg.epochs
    _, val = validation_split(fs.authors, 0.3, cfg.seed)
    with torch.no_grad():
        x = fs.features[torch.from_numpy(val), 0].float()
        xyz = torch.from_numpy(latlon_to_xyz(fs.lat[val], fs.lon[val])).float()
        kept = float(-m.mvmf.log_prob(m.mvmf(x), xyz).mean())
    assert kept == pytest.approx(min(h["mvmf_val"]), abs=1e-5)
    # and the held-out photos were not trained on: the training loss history differs from a no-hold-out run
    _, _, cfg0, m0 = _setup(tiny_workspace, lr=3e-3, rrm_epochs=1)
    assert train_heads(m0, fs, cfg0, progress=False)["mvmf"] != h["mvmf"]


def test_checkpoint_run_keys_survive_a_new_config_field():
    """Run keys digest only the settings that differ from the defaults, so a checkpoint written before a
    version added a field (at a default that keeps the old behaviour) still resumes."""
    import dataclasses

    from geoswc.core.config import non_default

    later = dataclasses.make_dataclass(
        "TrainConfig", [("new_knob", int, dataclasses.field(default=0))], bases=(TrainConfig,), frozen=True
    )
    assert non_default(later(epochs=3)) == non_default(TrainConfig(epochs=3)) == {"epochs": 3}
    assert non_default(later(epochs=3, new_knob=1)) == {"epochs": 3, "new_knob": 1}


def test_max_steps_bounds_every_epoch(tmp_path):
    from geoswc.training.checkpoint import Checkpointer, Phase, run_phase

    cfg = TrainConfig(max_steps=3)
    assert (cfg.steps(10), cfg.steps(2), TrainConfig().steps(10)) == (3, 2, 10)
    net, calls = torch.nn.Linear(2, 1), []

    def loss(batch):
        calls.append(batch)
        return (net(batch) ** 2).mean()

    batches = [torch.ones(4, 2)] * 10
    phase = Phase(
        "mvmf",
        2,
        cfg.steps(len(batches)),
        lambda rng: batches,
        loss,
        torch.optim.SGD(net.parameters(), lr=0.1),
        [0.1],
        [net],
        distributed.engine(),
    )
    history: dict = {}
    run_phase(phase, Checkpointer(None, "k", {"net": net}), 0, history, progress=False)
    assert len(calls) == 2 * 3 and len(history["mvmf"]) == 2


def test_positives_respect_radius_and_authors():
    lat = np.array([0.0, 0.001, 0.002, 10.0])
    lon = np.zeros(4)
    authors = np.array([0, 0, 1, 2])
    rng = np.random.default_rng(0)
    anchors = np.repeat(np.arange(4), 200)
    drawn = PositiveSampler(lat, lon, authors, 25.0).sample(anchors, rng)
    assert {a: set(drawn[anchors == a].tolist()) for a in range(4)} == {0: {2}, 1: {2}, 2: {0, 1}, 3: {-1}}
    drawn = PositiveSampler(lat, lon, authors, 25.0, same_author_positives=True).sample(anchors, rng)
    assert set(drawn[anchors == 0].tolist()) == {1, 2}


def _exact_positives(lat, lon, authors, r_km, same_author):
    d = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    ok = (d <= r_km) & ~np.eye(len(lat), dtype=bool)
    if not same_author:
        ok &= ~((authors[:, None] == authors[None, :]) & (authors[:, None] >= 0))
    return ok


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), r_km=st.sampled_from([0.0, 0.5, 25.0, 400.0, 5000.0]), same_author=st.booleans())
def test_sampled_positives_are_exactly_the_positives(seed, r_km, same_author):
    """Against brute force on clustered photos (poles and the antimeridian included): every draw is a true
    positive, an anchor without positives never gets one, and over many draws every positive of a photo
    with few of them turns up (the draw is uniform over them)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[89.9, 0.0], [-89.95, 120.0], [10.0, 179.999], [10.0, -179.999], [45.0, 7.0]])
    c = centres[rng.integers(len(centres), size=60)]
    lat = np.clip(c[:, 0] + rng.normal(0, 0.05, 60), -90, 90)
    lon = (c[:, 1] + rng.normal(0, 0.05, 60) + 180) % 360 - 180
    lat[:5], lon[:5] = lat[5], lon[5]  # photos at exactly one place
    authors = rng.integers(-1, 6, size=60)
    exact = _exact_positives(lat, lon, authors, r_km, same_author)
    anchors = np.repeat(np.arange(60), 300)
    drawn = PositiveSampler(lat, lon, authors, r_km, same_author, tries=64).sample(anchors, rng).reshape(60, 300)
    for a in range(60):
        got = set(drawn[a].tolist()) - {-1}
        assert got <= set(np.nonzero(exact[a])[0].tolist()), a
        assert bool(got) == bool(exact[a].any()), a
        if 0 < exact[a].sum() <= 5 and (drawn[a] >= 0).mean() > 0.9:
            assert got == set(np.nonzero(exact[a])[0].tolist())


@pytest.mark.slow
def test_finetune_end_to_end(tiny_workspace, tmp_path):
    from geoswc.data.shards import photo_shards
    from geoswc.training.finetune import finetune

    records, _ = read_photo_csv(tiny_workspace["csv"], DEV_IMAGES)
    records = records[:6]
    cells = CellTable.load(tiny_workspace["cells"])
    cfg = TrainConfig(epochs=1, batch_size=4, finetune=True, finetune_epochs=1)
    m = GeoModel.create(ModelConfig(train=cfg), cells)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    hist = finetune(m, photo_shards(records), cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert len(hist["finetune"]) == 1 and np.isfinite(hist["finetune"][0])
    after = m.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    fp = m.save(tmp_path / "model")
    again = GeoModel.load(tmp_path / "model")
    assert again.fingerprint == fp and again.config.backbone_finetuned
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(m(x)[0], again(x)[0], atol=1e-4)


@pytest.mark.slow
def test_the_same_photos_give_the_same_model_packed_as_shards_or_not(tiny_workspace, tmp_path):
    """Fine-tuning on a photo list and on the shards ``geoswc shards`` writes of it is one path: same weights."""
    import copy

    from geoswc.data.shards import photo_shards, write_shards
    from geoswc.training.finetune import finetune

    records, _ = read_photo_csv(tiny_workspace["csv"], DEV_IMAGES)
    records = records[:6]
    write_shards(records, tmp_path / "shards", verify=False, progress=False)
    cfg = TrainConfig(epochs=1, batch_size=4, finetune=True, finetune_epochs=1)
    start = GeoModel.create(ModelConfig(train=cfg), CellTable.load(tiny_workspace["cells"]))
    packed, listed = copy.deepcopy(start), copy.deepcopy(start)
    finetune(packed, str(tmp_path / "shards"), cfg, progress=False)
    finetune(listed, photo_shards(records), cfg, progress=False)
    a, b, s0 = packed.state_dict(), listed.state_dict(), start.state_dict()
    assert any(not torch.equal(a[k], s0[k]) for k in a if a[k].is_floating_point())  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
