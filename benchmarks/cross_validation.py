"""Author-disjoint k-fold cross-validation of a recipe on a geotagged photo set (default: recipes/default.yaml
on the Im2GPS3k development split in ../shared/data).

The cells and the feature cache come from the recipe's ``cells`` and ``features`` sections through the same
workflow functions as the commands. For each fold, the heads are trained (the ``train`` section's settings)
on the other folds' features, the other folds form the gallery, and the fold's photos are located with
every method:

- ``swc``: search within the chosen cell (the most probable one, or with ``select_km`` the densest region's),
- ``classification``: centroid of the chosen cell,
- ``retrieval``: SwC's clustering over the top-k of the whole gallery, no cell constraint,
- ``raw 1-NN``: the nearest gallery photo by cosine similarity of raw backbone features (no training),
- ``cell prior``: no pixels at all: every photo gets the centroid of the cell that ``select_km`` picks
  from the cells' shares of the coordinates they were built from. A method that does not beat this row
  has learned nothing from the photos at that threshold.

Run:  python benchmarks/cross_validation.py --out benchmarks/results/cross_validation.json [--also '[{select_km: 0}]']
It prints a Markdown table and writes it (``.md``) beside the JSON. ``--help`` lists the options.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoswc import workflow
from geoswc.core import atomic_files
from geoswc.core.config import ModelConfig, SearchChanges, SearchConfig
from geoswc.data.sources import Photos
from geoswc.data.splits import author_folds
from geoswc.evaluation.crossfit import OutOfFold, calibration_report, fold_locator, report_markdown
from geoswc.evaluation.evaluate import MethodResult
from geoswc.evaluation.metrics import accuracy_at, errors_km, median_km
from geoswc.geo.cells import CellTable
from geoswc.prediction.swc import select_cell
from geoswc.recipes import Recipe
from geoswc.training.features import FeatureSet

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
log = logging.getLogger("cross_validation")


@dataclass(frozen=True)
class CrossValidation:
    """Author-disjoint k-fold cross-validation of a recipe."""

    out: Path
    """The JSON results file (a ``.md`` table is written beside it)."""
    recipe: Path = ROOT / "recipes" / "default.yaml"
    """The recipe whose ``cells``, ``features`` and ``train`` sections are evaluated."""
    changes: dict[str, dict] = field(default_factory=dict)
    """Changes to the recipe's sections, e.g. ``{train: {train: {epochs: 1}}, features: {views: 1}}``."""
    data: Photos = field(
        default_factory=lambda: Photos(
            csv=SHARED / "im2gps3k-dev" / "im2gps3k-dev.csv", images=SHARED / "im2gps3k-dev" / "images"
        )
    )
    """The geotagged photos (a CSV and its image folder)."""
    cell_coords: Path = SHARED / "priors" / "mp16-coordinates-100k.csv"
    """The coordinates the cells are built from (CSV with lat, lon columns in any case)."""
    features: Path | None = None
    """A feature cache of the photos (``geoswc features``); default: extracted into ``cache``."""
    cache: Path = ROOT / "work" / "cv-features"
    """Where cells and extracted features are kept between runs."""
    folds: int = 5
    quick: bool = False
    """2 folds, 2 epochs of each head: a smoke run."""
    also: list[SearchChanges] = field(default_factory=list)
    """Extra swc rows, each with these search settings changed, e.g. ``[{select_km: 0}]``."""
    predictions: Path | None = None
    """Also write the ``swc`` method's out-of-fold predictions of every photo into this folder, as
    ``predictions.csv`` in the format of ``geoswc evaluate`` (so ``geoswc compare`` reads it like an
    evaluation folder)."""


def merged(recipe: Recipe, changes: dict[str, dict]) -> Recipe:
    """The recipe with ``changes`` applied to its sections (groups merged key by key)."""
    content = json.loads(json.dumps(recipe.content))
    for section, values in changes.items():
        target = content.setdefault(section, {}) or {}
        for key, value in values.items():
            target[key] = {**target.get(key, {}), **value} if isinstance(value, dict) else value
        content[section] = target
    return dataclasses.replace(recipe, content=content)


def get_features(opts: CrossValidation, recipe: Recipe) -> FeatureSet:
    """The photos' features: the given cache, else the recipe's ``features`` step (cached by its settings)."""
    if opts.features is not None:
        return FeatureSet.load(opts.features)
    section = recipe.section("features")
    cache = opts.cache / f"features-{Recipe(recipe.path, {'recipe': 'cv', 'features': section}).digest}"
    if not (cache / "features.json").is_file():
        data = {"csv": str(opts.data.csv), "images": str(opts.data.images)}
        workflow.features(**recipe.arguments("features", data=data, out=cache, run={"workers": 1}))
    return FeatureSet.load(cache)


def raw_nn(train: FeatureSet, test: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    g = torch.nn.functional.normalize(train.features[:, 0].float(), dim=-1)
    q = torch.nn.functional.normalize(test.features[:, 0].float(), dim=-1)
    nn_idx = (q @ g.T).argmax(1).numpy()
    return train.lat[nn_idx], train.lon[nn_idx]


def cell_prior(cells: CellTable, select_km: float) -> int:
    """The cell a pixel-blind guesser picks: the most populous one, or the one with the most photos within
    ``select_km`` (the same rule SwC applies to the classifier's probabilities)."""
    share = cells.count / cells.count.sum()
    return select_cell(share, cells.xyz, select_km)


def label(changes: SearchChanges) -> str:
    return "swc " + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items())


def fold_errors(
    feats: FeatureSet,
    cells: CellTable,
    train_args: dict[str, Any],
    tr: np.ndarray,
    te: np.ndarray,
    variants: dict[str, SearchConfig],
    keep: dict[str, list] | None = None,
) -> tuple[dict[str, np.ndarray], MethodResult]:
    """Train on rows ``tr``, locate rows ``te`` with every method; the errors in km of each, and the ``swc``
    predictions of the rows ``te`` (and, into ``keep``, the predictions of each method). The fold's model is
    :func:`geoswc.evaluation.crossfit.fold_locator`'s, the one that ``geoswc calibrate --features`` uses."""
    train, test = feats.subset(tr), feats.subset(te)
    config = ModelConfig(
        backbone=feats.backbone,
        heads=train_args["heads"],
        train=train_args["train"],
        search=train_args["search"],
        cells=cells.config,
    )
    fitted = fold_locator(feats, cells, config, tr)
    out, swc = {}, None
    for name, search in {
        "swc": train_args["search"],
        **variants,
        "classification": train_args["search"],
        "retrieval": train_args["search"],
    }.items():
        geo = fitted.with_settings(search=search)
        preds = geo.predict_features(test.features[:, 0], name.split()[0], names=test.names)  # type: ignore[arg-type]
        if keep is not None:
            keep[name] = preds
        out[name] = errors_km(test.lat, test.lon, [p.lat for p in preds], [p.lon for p in preds])
        if name == "swc":
            swc = MethodResult("swc", list(test.names), test.lat, test.lon, preds)
    assert swc is not None
    out["raw 1-NN"] = errors_km(test.lat, test.lon, *raw_nn(train, test))
    prior = cell_prior(cells, train_args["search"].select_km)
    out["cell prior"] = errors_km(test.lat, test.lon, cells.lat[prior], cells.lon[prior])
    return out, swc


def write_predictions(folder: Path, folds: list[tuple[np.ndarray, MethodResult]], argv: list[str]) -> None:
    """``folder/predictions.csv``: every photo's out-of-fold ``swc`` prediction, in the photo set's order."""
    order = np.argsort(np.concatenate([rows for rows, _ in folds]), kind="stable")
    parts = [r for _, r in folds]
    names = [n for r in parts for n in r.names]
    preds = [p for r in parts for p in r.predictions]
    merged_result = MethodResult(
        "swc",
        [names[i] for i in order],
        np.concatenate([r.true_lat for r in parts])[order],
        np.concatenate([r.true_lon for r in parts])[order],
        [preds[i] for i in order],
    )
    atomic_files.write_text(folder / "predictions.csv", merged_result.to_csv())
    atomic_files.write_json(
        folder / "run.json",
        {
            "method": "swc",
            "what": "out-of-fold predictions of the cross-validation",
            "command": shlex.join(["python", "benchmarks/cross_validation.py", *argv]),
        },
    )


def calibration(feats: FeatureSet, fold: np.ndarray, swc: list[Any]) -> dict[str, Any]:
    """How far the swc estimates can be trusted, out of fold: the ``calibration`` and ``selective`` blocks of
    ``geoswc evaluate`` for ``within_km`` from a calibrator fitted on the other folds' predictions (the embedded
    model's calibrator is fitted on all of them: ``geoswc calibrate --features``), and ``selective_density``
    ranked by the prediction density."""
    e = errors_km(feats.lat, feats.lon, [p.lat for p in swc], [p.lon for p in swc])
    return calibration_report(OutOfFold(fold, {"swc": swc}, {"swc": e}), "swc")


def run(opts: CrossValidation, argv: list[str]) -> dict[str, Any]:
    t0 = time.time()
    recipe = merged(Recipe.load(opts.recipe), opts.changes)
    if opts.quick:
        recipe = merged(recipe, {"train": {"train": {"epochs": 2, "rrm_epochs": 2}}})
    folds = 2 if opts.quick else opts.folds
    feats = get_features(opts, recipe)
    cells = workflow.cells(**recipe.arguments("cells", coords=opts.cell_coords, out=opts.cache / "cells.csv"))
    train_args = recipe.arguments("train", features=opts.cache, cells=opts.cache / "cells.csv", out=opts.cache)
    variants = {label(c): dataclasses.replace(train_args["search"], **c) for c in opts.also}
    fold = author_folds(feats.authors, folds)
    errors: dict[str, list[np.ndarray]] = {}
    swc_folds: list[tuple[np.ndarray, MethodResult]] = []
    swc: list[Any] = [None] * len(feats)  # the swc predictions, for the calibration report
    for f in range(folds):
        tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        kept: dict[str, list] = {}
        fold_err, swc_result = fold_errors(feats, cells, train_args, tr, te, variants, kept)
        swc_folds.append((te, swc_result))
        for name, e in fold_err.items():
            errors.setdefault(name, []).append(e)
        for i, p in zip(te, kept["swc"], strict=True):
            swc[i] = p
        log.info(
            "fold %d/%d: %d train, %d test; swc acc %s",
            f + 1,
            folds,
            len(tr),
            len(te),
            {k: round(v, 3) for k, v in accuracy_at(errors["swc"][-1]).items()},
        )
    if opts.predictions is not None:
        write_predictions(opts.predictions, swc_folds, argv)
    rows = {
        m: {
            "accuracy": accuracy_at(np.concatenate(e)),
            "median_km": median_km(np.concatenate(e)),
            "n": int(sum(len(x) for x in e)),
        }
        for m, e in errors.items()
    }
    return {
        "dataset": str(opts.data.csv),
        "recipe": recipe.content,
        "folds": folds,
        "n": len(feats),
        "cells": len(cells),
        "backbone": feats.backbone.name,
        "image_size": feats.backbone.preprocess.image_size,
        "resize": feats.backbone.preprocess.resize,
        "views": feats.views,
        "train": dataclasses.asdict(train_args["train"]),
        "heads": dataclasses.asdict(train_args["heads"]),
        "search": dataclasses.asdict(train_args["search"]),
        "methods": rows,
        "calibration": calibration(feats, fold, swc),
        "seconds": round(time.time() - t0, 1),
        "command": shlex.join(["python", "benchmarks/cross_validation.py", *argv]),
        "provenance": provenance(shlex.join(["python", "benchmarks/cross_validation.py", *argv])),
    }


def markdown_table(result: dict) -> str:
    keys = list(next(iter(result["methods"].values()))["accuracy"])
    lines = [
        f"Author-disjoint {result['folds']}-fold cross-validation, {result['n']} photos, {result['cells']} cells, "
        f"{result['backbone']} at {result['image_size']} px",
        "",
        "| method | " + " | ".join(f"{k} km" for k in keys) + " | median km |",
        "|---|" + "---:|" * (len(keys) + 1),
    ]
    for m, r in result["methods"].items():
        lines.append(
            f"| {m} | " + " | ".join(f"{100 * r['accuracy'][k]:.1f}" for k in keys) + f" | {r['median_km']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import auto_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    opts: CrossValidation = auto_cli(CrossValidation, args=argv, as_positional=False, return_instance=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = run(opts, argv)
    table = markdown_table(result) + "\n\n" + report_markdown(result["calibration"])
    print(table)
    atomic_files.write_report(opts.out, result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
