"""Author-disjoint k-fold cross-validation of geoswc on a geotagged photo set (default: the Im2GPS3k
development split in ../shared/data).

For each fold, the heads are trained on the other folds' cached features, the other folds form the
gallery, and the fold's photos are located with every method:

- ``swc``: search within the chosen cell (the most probable one, or with ``--select-km`` the densest region's),
- ``classification``: centroid of the most probable cell,
- ``retrieval``: SwC's clustering over the top-k of the whole gallery, no cell constraint,
- ``raw 1-NN``: the nearest gallery photo by cosine similarity of raw backbone features (no training),
- ``cell prior``: no pixels at all: every photo gets the centroid of the cell that ``select_km`` picks
  from the cells' shares of the coordinates they were built from. A method that does not beat this row
  has learned nothing from the photos at that threshold.

Run:  python benchmarks/cross_validation.py --out benchmarks/results/cross_validation.json
It prints a Markdown table and writes it (``.md``) beside the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from geoswc import storage
from geoswc.api import Geolocator
from geoswc.backbone import create_backbone, default_config
from geoswc.cells import CellTable, build_cells
from geoswc.config import CellConfig, HeadConfig, ModelConfig, SearchConfig, TrainConfig
from geoswc.data import author_folds, read_locations_csv
from geoswc.features import FeatureSet, extract_features
from geoswc.index import build_gallery
from geoswc.metrics import accuracy_at, errors_km, median_km
from geoswc.model import GeoModel
from geoswc.swc import neighborhood, select_cell
from geoswc.train import train_heads

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
log = logging.getLogger("cross_validation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON results file (a .md table is written beside it)")
    p.add_argument("--csv", type=Path, default=SHARED / "im2gps3k-dev" / "im2gps3k-dev.csv")
    p.add_argument("--images", type=Path, default=SHARED / "im2gps3k-dev" / "images")
    p.add_argument("--cell-coords", type=Path, default=SHARED / "priors" / "mp16-coordinates-100k.csv",
                   help="coordinates the cells are built from (CSV with LAT,LON or lat,lon)")
    p.add_argument("--features", type=Path, default=None,
                   help="feature cache (from `geoswc features`); extracted into --cache when absent")
    p.add_argument("--cache", type=Path, default=ROOT / "work" / "cv-features")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--resize", default="center_crop", choices=["center_crop", "squash"])
    p.add_argument("--views", type=int, default=5, help="cached views per photo (1 plain + augmented)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--max-per-cell", type=int, default=CellConfig.max_per_cell)
    p.add_argument("--min-per-cell", type=int, default=CellConfig.min_per_cell)
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("int", "float") and f.name not in ("seed", "checkpoint_every"):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int if f.type == "int" else float, default=None)
    p.add_argument("--mvmf-hidden", type=int, default=HeadConfig.mvmf_hidden)
    p.add_argument("--mvmf-dropout", type=float, default=HeadConfig.mvmf_dropout)
    p.add_argument("--k", type=int, default=SearchConfig.k)
    p.add_argument("--eps-km", type=float, default=SearchConfig.eps_km)
    p.add_argument("--select-km", type=float, default=SearchConfig.select_km)
    p.add_argument("--search-km", type=float, default=SearchConfig.search_km)
    p.add_argument("--also", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                   help="an extra swc row with these search settings changed, e.g. select_km=0 (repeatable)")
    p.add_argument("--same-author-positives", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 folds, few epochs: a smoke run")
    p.add_argument("--recipe", type=Path, default=None,
                   help="take the settings of a model recipe (e.g. recipes/default.json); flags still override")
    known, _ = p.parse_known_args(argv)
    if known.recipe is not None:
        p.set_defaults(**recipe_defaults(json.loads(known.recipe.read_text())))
    return p.parse_args(argv)


def recipe_defaults(recipe: dict) -> dict:
    """Flag defaults from a recipe's sections (the keys are the flags' names)."""
    out: dict = {}
    for section in ("cells", "backbone", "features", "train", "heads", "search"):
        out |= recipe.get(section, {})
    out["image_size"] = out.pop("image_size", None)
    return {k: v for k, v in out.items() if k not in ("r_km", "min_samples")}


def parse_spec(spec: str) -> dict:
    """``"select_km=0,k=5"`` -> ``{"select_km": 0.0, "k": 5}`` (SearchConfig fields)."""
    types = {f.name: f.type for f in dataclasses.fields(SearchConfig)}
    out = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in types:
            raise SystemExit(f"--also: unknown search setting {key!r}; known: {', '.join(types)}")
        out[key] = int(value) if types[key] == "int" else float(value)
    return out


def load_coords(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, encoding="utf-8") as f:
        header = [h.strip().lower() for h in f.readline().split(",")]
    a = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(header.index("lat"), header.index("lon")))
    return a[:, 0], a[:, 1]


def get_features(args: argparse.Namespace) -> FeatureSet:
    if args.features is not None:
        return FeatureSet.load(args.features)
    bcfg = default_config(args.backbone, args.image_size, args.resize)
    key = f"{args.backbone}-{bcfg.preprocess.image_size}-{args.resize}-v{args.views}"
    cache = args.cache / key
    if (cache / "features.json").is_file():
        return FeatureSet.load(cache)
    records, _ = read_locations_csv(args.csv, args.images)
    backbone, bcfg = create_backbone(bcfg)
    fs, _ = extract_features(backbone.to(memory_format=torch.channels_last), bcfg, records, views=args.views,
                             batch_size=32, num_workers=1)
    fs.save(cache)
    return fs


def raw_nn(train: FeatureSet, test: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    g = torch.nn.functional.normalize(train.features[:, 0].float(), dim=-1)
    q = torch.nn.functional.normalize(test.features[:, 0].float(), dim=-1)
    nn_idx = (q @ g.T).argmax(1).numpy()
    return train.lat[nn_idx], train.lon[nn_idx]


def cell_prior(cells: CellTable, select_km: float) -> int:
    """The cell a pixel-blind guesser picks: the most populous one, or the one with the most photos within
    ``select_km`` (the same rule SwC applies to the classifier's probabilities)."""
    share = cells.count / cells.count.sum()
    return select_cell(share, neighborhood(cells.xyz, select_km) if select_km > 0 else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    feats = get_features(args)
    lat, lon = load_coords(args.cell_coords)
    cells = build_cells(lat, lon, CellConfig(args.max_per_cell, args.min_per_cell))
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    overrides["same_author_positives"] = args.same_author_positives
    overrides["seed"] = args.seed
    train_cfg = dataclasses.replace(TrainConfig(), **overrides)
    folds_n = args.folds
    if args.quick:
        train_cfg = dataclasses.replace(train_cfg, epochs=2, rrm_epochs=2)
        folds_n = 2
    search = SearchConfig(k=args.k, eps_km=args.eps_km, select_km=args.select_km, search_km=args.search_km)
    variants = {f"swc {spec}": dataclasses.replace(search, **parse_spec(spec)) for spec in args.also}
    heads = HeadConfig(mvmf_hidden=args.mvmf_hidden, mvmf_dropout=args.mvmf_dropout)
    fold = author_folds(feats.authors, folds_n)
    methods = ["swc", *variants, "classification", "retrieval", "raw 1-NN", "cell prior"]
    prior_cell = cell_prior(cells, search.select_km)
    errors: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for f in range(folds_n):
        tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        train, test = feats.subset(tr), feats.subset(te)
        cfg = ModelConfig(backbone=feats.backbone, heads=heads, train=train_cfg, search=search,
                          cells=CellConfig(args.max_per_cell, args.min_per_cell))
        model = GeoModel(cfg, cells)
        train_heads(model, train, train_cfg, progress=False)
        gallery = build_gallery(model, train.features[:, 0], train.lat, train.lon, train.names, train.authors)
        geo = Geolocator(model, gallery, search)
        for m in methods[:-2]:
            geo.search = variants.get(m, search)
            preds = geo.predict_features(test.features[:, 0], m.split()[0], names=test.names)  # type: ignore[arg-type]
            errors[m].append(errors_km(test.lat, test.lon, [p.lat for p in preds], [p.lon for p in preds]))
        plat, plon = raw_nn(train, test)
        errors["raw 1-NN"].append(errors_km(test.lat, test.lon, plat, plon))
        errors["cell prior"].append(errors_km(test.lat, test.lon, cells.lat[prior_cell], cells.lon[prior_cell]))
        log.info("fold %d/%d: %d train, %d test; swc acc %s", f + 1, folds_n, len(tr), len(te),
                 {k: round(v, 3) for k, v in accuracy_at(errors["swc"][-1]).items()})
    rows = {}
    for m in methods:
        e = np.concatenate(errors[m])
        rows[m] = {"accuracy": accuracy_at(e), "median_km": median_km(e), "n": int(e.size)}
    result = {
        "dataset": str(args.csv), "folds": folds_n, "n": len(feats), "cells": len(cells),
        "backbone": feats.backbone.name, "image_size": feats.backbone.preprocess.image_size,
        "resize": feats.backbone.preprocess.resize, "views": feats.views,
        "cell_config": {"max_per_cell": args.max_per_cell, "min_per_cell": args.min_per_cell},
        "train": dataclasses.asdict(train_cfg), "heads": dataclasses.asdict(heads),
        "search": dataclasses.asdict(search), "methods": rows, "seconds": round(time.time() - t0, 1),
        "command": "python benchmarks/cross_validation.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    table = markdown_table(result)
    print(table)
    storage.write_text(args.out, json.dumps(result, indent=2) + "\n")  # atomic, creates the folder
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


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
        lines.append(f"| {m} | " + " | ".join(f"{100 * r['accuracy'][k]:.1f}" for k in keys)
                     + f" | {r['median_km']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
