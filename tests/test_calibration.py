"""Calibrated probabilities: the math of ECE, Brier and selective accuracy against hand-computed cases, the
calibrator's monotonicity and fit (property-based), its file contract (round trip, tamper, another model's), and
the abstention rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from geoswc.core.errors import ArtifactError, ModelMismatchError, SettingError
from geoswc.evaluation.metrics import brier, calibration_block, ece, selective_accuracy, selective_block
from geoswc.prediction.calibration import (
    CALIBRATION_FILE,
    SIGNALS,
    THRESHOLD_KEYS,
    Abstention,
    Calibrator,
    LocalizableRule,
    MethodCalibration,
    fit_calibrator,
    monotone,
    retrieval_signals,
    signal_matrix,
)
from geoswc.prediction.geolocator import Geolocator, default_model_dir

# -- the math ---------------------------------------------------------------------------------------------


def test_ece_by_hand() -> None:
    # 4 photos, 2 equal-mass bins: {0.1, 0.2} observed 0 of 2 -> |0.15 - 0| ; {0.7, 0.9} observed 1 of 2 -> |0.8 - 0.5|
    assert ece([0.9, 0.1, 0.7, 0.2], [1, 0, 0, 0], bins=2) == pytest.approx(0.5 * 0.15 + 0.5 * 0.3)
    assert ece([0.25] * 8, [1, 0, 0, 0] * 2) == pytest.approx(0.0)  # right on average in every bin
    assert ece([], []) == 0.0
    assert ece([1.0, 1.0], [0, 0]) == pytest.approx(1.0)


def test_ece_uses_ten_equal_mass_bins() -> None:
    # 100 photos whose probabilities are all different: 10 bins of 10, each off by its own amount.
    p = np.linspace(0.0, 0.99, 100)
    y = np.zeros(100)
    expected = np.mean([p[i * 10 : (i + 1) * 10].mean() for i in range(10)])
    assert ece(p, y) == pytest.approx(expected)


def test_brier_by_hand() -> None:
    assert brier([0.1, 0.9, 0.5], [0, 1, 1]) == pytest.approx((0.01 + 0.01 + 0.25) / 3)
    assert brier([], []) == 0.0


def test_selective_accuracy_by_hand() -> None:
    conf = [0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4, 0.05]
    hit = [1, 0, 0, 1, 0, 1, 1, 0, 0, 0]
    # ranked: 0.9 (1), 0.8 (1), 0.7 (1), 0.6 (0), 0.5 (0), ... ; ceil(0.25 * 10) = 3 photos kept
    assert selective_accuracy(conf, hit, [0.1, 0.25, 0.5, 1.0]) == pytest.approx([1.0, 1.0, 0.6, 0.4])
    assert selective_accuracy([], [], [0.5]) == [0.0]


def test_blocks_have_the_metrics_json_shape() -> None:
    rng = np.random.default_rng(0)
    errors = rng.random(50) * 5000
    within = monotone(rng.random((50, 5)))
    cal = calibration_block(within, errors)
    assert list(cal) == ["ece", "brier"] and list(cal["ece"]) == list(THRESHOLD_KEYS)
    sel = selective_block(within, errors)
    assert sel["coverage"] == [0.1, 0.25, 0.5, 0.75, 1.0] and list(sel["accuracy"]) == ["25", "750", "2500"]
    assert sel["accuracy"]["2500"][-1] == pytest.approx(np.mean(errors <= 2500))


@settings(max_examples=60, deadline=None)
@given(conf=arrays(np.float64, st.integers(1, 60), elements=st.floats(0, 1)), seed=st.integers(0, 100))
def test_a_perfect_ranking_never_loses_accuracy_by_abstaining(conf: np.ndarray, seed: int) -> None:
    """Ranked by a confidence that orders hits first, accuracy never rises with coverage; at full coverage it is
    the plain accuracy whatever the ranking."""
    hit = (np.random.default_rng(seed).random(conf.size) < 0.4).astype(float)
    acc = selective_accuracy(hit + 0.5 * conf, hit)
    assert all(a >= b - 1e-12 for a, b in zip(acc, acc[1:], strict=False))
    assert selective_accuracy(conf, hit)[-1] == pytest.approx(hit.mean())


@settings(max_examples=60, deadline=None)
@given(p=arrays(np.float64, st.integers(1, 80), elements=st.floats(0, 1)), seed=st.integers(0, 100))
def test_ece_and_brier_are_in_range(p: np.ndarray, seed: int) -> None:
    y = np.random.default_rng(seed).random(p.size) < 0.5
    assert 0.0 <= ece(p, y) <= 1.0 and 0.0 <= brier(p, y) <= 1.0
    assert ece(p, y) <= np.mean(np.abs(p - y)) + 1e-12  # binning can only average errors out


# -- the calibrator -----------------------------------------------------------------------------------------


def synthetic(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Signals whose density at 2500 km is the chance of being within 2500 km, and errors drawn accordingly."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, len(SIGNALS)))
    x[:, SIGNALS.index("fallback")] = 0.0
    x[:, :4] = np.sort(x[:, :4], axis=1)  # densities grow with the radius
    good = rng.random(n) < x[:, 3]
    errors = np.where(good, rng.random(n) * 2400, 3000 + rng.random(n) * 8000)
    return x, errors


def test_fit_tracks_the_truth_and_constant_thresholds() -> None:
    x, e = synthetic(2000)
    cal = MethodCalibration.fit(x, e)
    p = cal.predict(x)
    assert p.shape == (2000, 5)
    assert ece(p[:, 4], e <= 2500) < 0.05  # in-sample, a well-specified signal
    assert np.corrcoef(p[:, 4], x[:, 3])[0, 1] > 0.9
    assert cal.positives[0] == int((e <= 1).sum())
    # no photo within 200 km... except by chance: force one threshold with no positives
    e2 = np.where(e <= 2500, 2400.0, 9000.0)
    cal2 = MethodCalibration.fit(x, e2)
    assert cal2.coef[0] == [0.0] * len(SIGNALS) and cal2.predict(x)[:, 0].max() < 0.01


@pytest.mark.slow
@settings(max_examples=50, deadline=None)
@given(
    x=arrays(
        np.float64, st.tuples(st.integers(1, 20), st.just(len(SIGNALS))), elements=st.floats(-1e6, 1e6, allow_nan=False)
    )
)
def test_within_km_never_decreases_with_the_threshold(x: np.ndarray) -> None:
    cal = MethodCalibration.fit(*synthetic(300, seed=1))
    p = cal.predict(x)
    assert np.all((p >= 0) & (p <= 1)) and np.all(np.diff(p, axis=1) >= 0)


def test_monotone_is_a_running_maximum() -> None:
    assert monotone([[0.2, 0.1, 0.5, 0.4, 1.2]]).tolist() == [[0.2, 0.2, 0.5, 0.5, 1.0]]


def test_retrieval_signals_by_hand() -> None:
    s = retrieval_signals([0.9, 0.5, 0.7, 0.1], [0, 1, 0, -1], cluster=0, k=10)
    assert s == pytest.approx({"top_similarity": 0.9, "cluster_size": 0.2, "cluster_similarity": 0.8, "fallback": 0.0})
    assert retrieval_signals([], [], -1, 10, fallback=True)["fallback"] == 1.0
    assert signal_matrix([{"density_25": 0.5}]).tolist()[0][:2] == [0.5, 0.0]


def test_rule_and_abstention_flags() -> None:
    saved = LocalizableRule(750.0, 0.3)
    assert Abstention().rule(saved) == saved
    assert Abstention(p=0.6).rule(saved) == LocalizableRule(750.0, 0.6)
    with pytest.raises(SettingError) as e:
        Abstention(within_km=30.0)
    assert e.value.field == "within_km" and e.value.owner is Abstention
    with pytest.raises(SettingError):
        LocalizableRule(p=1.5)


# -- the file contract --------------------------------------------------------------------------------------


@pytest.fixture
def calibrated(tmp_path: Path) -> Path:
    """A copy of the embedded model with a calibrator fitted on synthetic signals (a fresh file each test)."""
    folder = Path(shutil.copytree(default_model_dir(), tmp_path / "model"))
    (folder / CALIBRATION_FILE).unlink(missing_ok=True)
    fp = json.loads((folder / "config.json").read_text())["fingerprint"]
    x, e = synthetic()
    fit_calibrator(fp, {"swc": (x, e)}, LocalizableRule(2500.0, 0.4), fitted={"how": "test"}).save(
        folder / CALIBRATION_FILE
    )
    return folder


def test_round_trip_and_every_prediction_carries_within_km(calibrated: Path) -> None:
    cal = Calibrator.load(calibrated / CALIBRATION_FILE)
    assert cal.rule == LocalizableRule(2500.0, 0.4) and cal.fitted == {"how": "test"}
    geo = Geolocator.load(calibrated, with_backbone=False)
    assert geo.calibrator == cal and geo.rule == cal.rule
    import torch

    preds = geo.predict_features(torch.randn(4, geo.model.config.backbone.feature_dim))
    for p in preds:
        assert set(p.signals) == set(SIGNALS)
        assert list(p.within_km) == list(THRESHOLD_KEYS)
        assert list(p.within_km.values()) == sorted(p.within_km.values())
        assert p.localizable == (p.within_km["2500"] >= 0.4)
    # a method the calibrator was not fitted for carries none
    assert geo.predict_features(torch.randn(1, geo.model.config.backbone.feature_dim), "retrieval")[0].within_km is None


def test_model_without_a_calibrator_loads_and_says_so(calibrated: Path, caplog: pytest.LogCaptureFixture) -> None:
    (calibrated / CALIBRATION_FILE).unlink()
    geo = Geolocator.load(calibrated, with_backbone=False)
    assert geo.calibrator is None and "has no calibrator" in caplog.text
    import torch

    p = geo.predict_features(torch.randn(1, geo.model.config.backbone.feature_dim))[0]
    assert p.within_km is None and p.localizable is None and p.signals


def test_calibrator_of_another_model_is_refused(calibrated: Path) -> None:
    path = calibrated / CALIBRATION_FILE
    cal = Calibrator.load(path)
    other = Calibrator("0123456789abcdef", cal.methods, cal.rule)
    other.save(path)
    with pytest.raises(ModelMismatchError, match="geoswc calibrate"):
        Geolocator.load(calibrated, with_backbone=False)


def test_a_changed_coefficient_is_refused(calibrated: Path) -> None:
    path = calibrated / CALIBRATION_FILE
    meta = json.loads(path.read_text())
    meta["methods"]["swc"]["intercept"][4] += 1.0
    path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="changed"):
        Calibrator.load(path)
    # resealed by hand, the fingerprint still gives it away
    from geoswc.core.json_records import seal

    meta.pop("meta_sha256")
    path.write_text(json.dumps(seal(meta)))
    with pytest.raises(ArtifactError, match="fingerprint"):
        Calibrator.load(path)


@pytest.mark.parametrize("damage", ["coef_shape", "nan", "rule", "format", "not_json"])
def test_damaged_calibrator_is_refused(calibrated: Path, damage: str) -> None:
    from geoswc.core.json_records import seal

    path = calibrated / CALIBRATION_FILE
    meta = json.loads(path.read_text())
    meta.pop("meta_sha256")
    if damage == "coef_shape":
        meta["methods"]["swc"]["coef"][0] = [1.0]
    elif damage == "nan":
        meta["methods"]["swc"]["mean"][0] = "NaN"
    elif damage == "rule":
        meta["rule"]["within_km"] = 30
    elif damage == "format":
        meta["format"] = "geoswc-calibration/0"
    path.write_text("{not json" if damage == "not_json" else json.dumps(seal(meta)))
    with pytest.raises(ArtifactError) as e:
        Calibrator.load(path)
    assert str(path.parent) in str(e.value)


@settings(max_examples=60, deadline=None)
@given(p=arrays(np.float64, st.integers(1, 80), elements=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9])))
def test_equal_mass_bins_partition_and_keep_ties_together(p: np.ndarray) -> None:
    from geoswc.evaluation.metrics import equal_mass_bins

    parts = equal_mass_bins(p, 10)
    assert sorted(np.concatenate(parts).tolist()) == list(range(p.size)) and len(parts) <= 10
    values = [set(p[b].tolist()) for b in parts]
    assert all(not (a & b) for i, a in enumerate(values) for b in values[i + 1 :])


# -- the commands -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_calibrate_then_locate_and_evaluate(tiny_workspace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from geoswc.cli import main

    from .conftest import DEV_IMAGES, KAUAI, dev_rows, write_csv

    model = Path(
        shutil.copytree(tiny_workspace["model"], tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint*"))
    )
    fingerprint = json.loads((model / "config.json").read_text())["fingerprint"]
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(model),
                "--features",
                str(tiny_workspace["features"]),
                "--folds",
                "2",
                "--rule.within_km",
                "2500",
                "--rule.p",
                "0.3",
                "--report",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report" / "calibration.json").read_text())
    assert (
        report["model"] == fingerprint
        and report["n"] == 60
        and "| ece |" in (tmp_path / "report" / "calibration.md").read_text()
    )
    assert (tmp_path / "report" / "reliability.png").is_file() and (tmp_path / "report" / "selective.png").is_file()
    folds = report["per_fold"]  # each fold's own accuracy: together, the whole's
    assert len(folds) == 2 and sum(f["n"] for f in folds) == 60
    for k in THRESHOLD_KEYS:
        assert sum(f["n"] * f["accuracy"][k] for f in folds) / 60 == pytest.approx(report["accuracy"][k])

    cal = Calibrator.load(model / CALIBRATION_FILE)
    assert cal.model == fingerprint and set(cal.methods) == {"swc", "classification", "retrieval"}
    assert cal.fitted["folds"] == 2 and cal.fitted["n"] == 60 and cal.rule == LocalizableRule(2500.0, 0.3)
    assert set(cal.fitted["cross_fitted"]["calibration"]["ece"]) == set(THRESHOLD_KEYS)
    assert json.loads((model / "config.json").read_text())["fingerprint"] == fingerprint  # the model is unchanged
    capsys.readouterr()

    assert main(["locate", str(KAUAI), "--model", str(model), "--format", "jsonl"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert list(p["within_km"]) == list(THRESHOLD_KEYS) and isinstance(p["localizable"], bool)
    assert list(p["within_km"].values()) == sorted(p["within_km"].values()) and set(p["signals"]) == set(SIGNALS)
    assert p["localizable"] == (p["within_km"]["2500"] >= 0.3)
    assert main(["locate", str(KAUAI), "--model", str(model)]) == 0
    text = capsys.readouterr().out
    assert "within 25 km:" in text and "within 2500 km:" in text and "localizable" in text

    photos = [str(DEV_IMAGES / r["image"]) for r in dev_rows(3, step=211)]
    out = tmp_path / "kept.csv"
    assert (
        main(
            [
                "locate",
                *photos,
                "--model",
                str(model),
                "--abstain.p",
                "1.0",
                "--abstain.leave_out",
                "true",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_text().splitlines()[1:] == []  # nobody is sure to be within 2500 km: all left out
    assert main(["locate", *photos, "--model", str(model), "--abstain.p", "0", "--output", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 4 and "within_2500_km" in rows[0] and all(r.split(",")[13] == "True" for r in rows[1:])

    rows = dev_rows(12, step=101)
    ev = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--data.csv",
                str(write_csv(tmp_path / "bench.csv", rows)),
                "--data.images",
                str(DEV_IMAGES),
                "--out",
                str(ev),
                "--model",
                str(model),
            ]
        )
        == 0
    )
    m = json.loads((ev / "metrics.json").read_text())
    assert list(m["calibration"]) == ["ece", "brier"] and list(m["calibration"]["ece"]) == list(THRESHOLD_KEYS)
    assert list(m["selective"]["accuracy"]) == ["25", "750", "2500"]
    assert m["selective"]["accuracy"]["2500"][-1] == pytest.approx(m["accuracy"]["2500"])
    for png in ("reliability.png", "selective.png", "accuracy.png"):
        assert (ev / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ECE" in capsys.readouterr().out

    # on a labelled set instead, and refusals that name the fix
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(model),
                "--data.csv",
                str(tmp_path / "bench.csv"),
                "--data.images",
                str(DEV_IMAGES),
                "--exclude_same_author",
                "true",
            ]
        )
        == 0
    )
    assert Calibrator.load(model / CALIBRATION_FILE).fitted["how"] == "labelled set bench.csv"
    assert main(["calibrate", "--model", str(model)]) == 2
    assert "--features" in capsys.readouterr().err
    assert main(["locate", str(KAUAI), "--model", str(tiny_workspace["model"]), "--abstain.leave_out", "true"]) == 2
    err = capsys.readouterr().err
    assert "--abstain.leave_out" in err and "calibrator" in err

    # a model retrained in its folder keeps a stale calibrator: train warns, and loading refuses it
    assert (
        main(
            [
                "train",
                "--features",
                str(tiny_workspace["features"]),
                "--cells",
                str(tiny_workspace["cells"]),
                "--out",
                str(model),
                "--train.epochs",
                "1",
                "--train.rrm_epochs",
                "1",
                "--train.batch_size",
                "16",
            ]
        )
        == 0
    )
    assert "refit it with `geoswc calibrate" in capsys.readouterr().err
    shutil.rmtree(model / "index")  # stale too; without it, the calibrator is the one refused
    with pytest.raises(ModelMismatchError, match="geoswc calibrate"):
        Geolocator.load(model, with_backbone=False)
