"""Training: losses go down, runs are reproducible, checkpoints resume, and fine-tuning runs end to end."""

import numpy as np
import pytest
import torch

from geoswc.cells import CellTable
from geoswc.config import ModelConfig, TrainConfig
from geoswc.data import read_photo_csv
from geoswc.errors import InputError
from geoswc.features import FeatureSet
from geoswc.geo import latlon_to_xyz
from geoswc.model import GeoModel
from geoswc.train import positive_lists, train_heads, validation_split

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

    from geoswc.config import non_default

    later = dataclasses.make_dataclass("TrainConfig", [("new_knob", int, dataclasses.field(default=0))],
                                       bases=(TrainConfig,), frozen=True)
    assert non_default(later(epochs=3)) == non_default(TrainConfig(epochs=3)) == {"epochs": 3}
    assert non_default(later(epochs=3, new_knob=1)) == {"epochs": 3, "new_knob": 1}


def test_positive_lists_respect_authors():
    lat = np.array([0.0, 0.001, 0.002, 10.0])
    lon = np.zeros(4)
    authors = np.array([0, 0, 1, 2])
    pos = positive_lists(lat, lon, authors, 25.0, same_author_positives=False)
    assert pos[0].tolist() == [2] and pos[1].tolist() == [2] and pos[3].tolist() == []
    pos = positive_lists(lat, lon, authors, 25.0, same_author_positives=True)
    assert pos[0].tolist() == [1, 2]


@pytest.mark.slow
def test_finetune_end_to_end(tiny_workspace, tmp_path):
    from geoswc.finetune import finetune

    records, _ = read_photo_csv(tiny_workspace["csv"], DEV_IMAGES)
    records = records[:6]
    cells = CellTable.load(tiny_workspace["cells"])
    cfg = TrainConfig(epochs=1, batch_size=4, finetune=True, finetune_epochs=1)
    m = GeoModel.create(ModelConfig(train=cfg), cells)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    hist = finetune(m, records, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert len(hist["finetune"]) == 1 and np.isfinite(hist["finetune"][0])
    after = m.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    fp = m.save(tmp_path / "model")
    again = GeoModel.load(tmp_path / "model")
    assert again.fingerprint == fp and again.config.backbone_finetuned
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(m(x)[0], again(x)[0], atol=1e-4)
