"""Out-of-fold predictions: train the heads on all photographers but one fold's, use them as the gallery, and
locate that fold's photos. The cross-validation benchmark and ``geoswc calibrate --features`` share it, so the
calibrator of a model is fitted on exactly the kind of predictions the benchmark reports."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoswc.core.config import ModelConfig
from geoswc.core.progress import progress_bar
from geoswc.core.sphere import THRESHOLDS_KM
from geoswc.data.splits import author_folds
from geoswc.evaluation.evaluate import plot_reliability, plot_selective
from geoswc.evaluation.metrics import accuracy_at, calibration_block, errors_km, selective_block
from geoswc.geo.cells import CellTable
from geoswc.models.geomodel import GeoModel
from geoswc.prediction.calibration import MethodCalibration, rounded, signal_matrix
from geoswc.prediction.geolocator import Geolocator
from geoswc.prediction.results import Prediction
from geoswc.training.features import FeatureSet
from geoswc.training.train import train_heads

log = logging.getLogger(__name__)


def fold_locator(feats: FeatureSet, cells: CellTable, config: ModelConfig, rows: np.ndarray) -> Geolocator:
    """A heads-only locator trained (``config.train``) on the features of ``rows``, whose gallery is those photos.

    Args:
        feats: features ``(N, V, D)`` with positions and authors.
        cells: the classifier's cells.
        config: the heads, training and search settings (its backbone must be ``feats``').
        rows: the training photos' indices ``(n,)``.
    """
    train = feats.subset(rows)
    model = GeoModel(
        ModelConfig(
            backbone=feats.backbone, heads=config.heads, train=config.train, search=config.search, cells=cells.config
        ),
        cells,
    )
    train_heads(model, train, config.train, progress=False)
    gallery = model.gallery(train.features[:, 0], train.lat, train.lon, train.names, train.authors)
    return Geolocator(model, gallery, config.search)


@dataclass
class OutOfFold:
    """Each photo located once by the fold model that did not see its photographer, in the features' order."""

    fold: np.ndarray
    """The fold of each photo ``(N,)``."""
    predictions: dict[str, list[Prediction]]
    """Per method, one prediction per photo."""
    errors_km: dict[str, np.ndarray]
    """Per method, the great-circle error of each prediction ``(N,)``."""


def out_of_fold(
    feats: FeatureSet,
    cells: CellTable,
    config: ModelConfig,
    folds: int = 5,
    methods: Sequence[str] = ("swc", "classification", "retrieval"),
    progress: bool = True,
) -> OutOfFold:
    """Out-of-fold predictions of every method over ``folds`` author-disjoint folds
    (:func:`~geoswc.data.splits.author_folds`)."""
    fold = author_folds(feats.authors, folds)
    preds: dict[str, list[Prediction | None]] = {m: [None] * len(feats) for m in methods}
    for f in progress_bar(range(folds), desc="folds", unit="fold", show=progress):
        tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        geo = fold_locator(feats, cells, config, tr)
        test = feats.subset(te)
        for m in methods:
            for i, p in zip(
                te,
                geo.predict_features(test.features[:, 0], m, names=test.names),  # type: ignore[arg-type]
                strict=True,
            ):
                preds[m][i] = p
        log.info("fold %d/%d: %d train, %d test", f + 1, folds, len(tr), len(te))
    full = {m: [p for p in ps if p is not None] for m, ps in preds.items()}
    errors = {m: errors_km(feats.lat, feats.lon, [p.lat for p in ps], [p.lon for p in ps]) for m, ps in full.items()}
    return OutOfFold(fold, full, errors)


def cross_fitted(oof: OutOfFold, method: str = "swc") -> np.ndarray:
    """Calibrated ``within_km`` ``(N, T)`` of each photo from a calibrator fitted on the *other* folds'
    out-of-fold predictions: an honest measure of a calibrator fitted out-of-fold (no photo's outcome is used to
    calibrate its own probability)."""
    x = signal_matrix([p.signals for p in oof.predictions[method]])
    e = oof.errors_km[method]
    within = np.zeros((len(x), len(THRESHOLDS_KM)))
    for f in np.unique(oof.fold):
        test = oof.fold == f
        within[test] = MethodCalibration.fit(x[~test], e[~test]).predict(x[test])
    return within


def calibration_report(oof: OutOfFold, method: str = "swc", plots: Path | None = None) -> dict[str, Any]:
    """The ``calibration`` and ``selective`` blocks of ``geoswc evaluate`` for the cross-fitted ``within_km``
    (:func:`cross_fitted`), ``selective_density``: the same ranked by the prediction density instead, and
    ``per_fold``: each fold's photos and accuracy (a calibrator fitted on the other folds cannot know it). With
    ``plots``, also ``reliability.png`` and ``selective.png`` in that folder, as ``geoswc evaluate`` draws them."""
    within, e = cross_fitted(oof, method), oof.errors_km[method]
    density = np.array([p.confidence for p in oof.predictions[method]])
    report = {
        "method": method,
        "n": len(e),
        "accuracy": accuracy_at(e),
        "calibration": calibration_block(within, e),
        "selective": selective_block(within, e),
        "selective_density": selective_block(density, e),
        "per_fold": [
            {"n": int((oof.fold == f).sum()), "accuracy": accuracy_at(e[oof.fold == f])} for f in np.unique(oof.fold)
        ],
    }
    if plots is not None:
        what = f"{method}, {len(e)} photos, out of fold, cross-fitted"
        plot_reliability(within, e, plots / "reliability.png", f"Reliability of within_km ({what})")
        plot_selective(within, e, plots / "selective.png", f"Selective prediction ({what}; ranked by within_km)")
    return report


def report_markdown(report: dict[str, Any]) -> str:
    """A :func:`calibration_report` as Markdown: ECE and Brier per threshold, then accuracy against coverage."""
    keys = list(report["calibration"]["ece"])
    lines = ["| within_km | " + " | ".join(f"{k} km" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [
        f"| {name} | " + " | ".join(f"{report['calibration'][name][k]:.3f}" for k in keys) + " |"
        for name in ("ece", "brier")
    ]
    if "accuracy" in report:
        lines.append("| accuracy | " + " | ".join(f"{report['accuracy'][k]:.3f}" for k in keys) + " |")
    for f, fold in enumerate(report.get("per_fold", [])):
        lines.append(
            f"| accuracy, fold {f + 1} ({fold['n']} photos) | "
            + " | ".join(f"{fold['accuracy'][k]:.3f}" for k in keys)
            + " |"
        )
    cov = report["selective"]["coverage"]
    lines += [
        "",
        "| accuracy (%) among the most confident | " + " | ".join(f"{100 * c:g} %" for c in cov) + " |",
        "|---|" + "---:|" * len(cov),
    ]
    for block, by in (("selective", "within_km"), ("selective_density", "prediction density")):
        lines += [
            f"| within {k} km, ranked by {by} | " + " | ".join(f"{100 * v:.1f}" for v in acc) + " |"
            for k, acc in report[block]["accuracy"].items()
        ]
    return "\n".join(lines)


def out_of_fold_signals(
    feats: FeatureSet, model: GeoModel, folds: int, plots: Path | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """What a calibrator is fitted on, out of fold: per method, the signals ``(N, S)`` and errors ``(N,)`` of each
    photo located by the fold model that did not see its photographer (:func:`out_of_fold`, with ``model``'s
    cells and settings); and how: the folds and the cross-fitted report (:func:`calibration_report`, its plots
    in ``plots``)."""
    oof = out_of_fold(feats, model.cells, model.config, folds)
    per_method = {k: (signal_matrix([p.signals for p in ps]), oof.errors_km[k]) for k, ps in oof.predictions.items()}
    cross = rounded(calibration_report(oof, "swc", plots))
    how = f"out-of-fold, {folds} author-disjoint folds"
    return per_method, {"how": how, "n": len(feats), "folds": folds, "cross_fitted": cross}
